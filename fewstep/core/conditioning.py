"""Conditioning and batch containers shared by every backbone and method.

``Cond`` replaces long positional argument lists (SDXL time ids, pooled embeddings, masks, class labels,
guidance embeddings); fields a family does not use stay ``None``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


def _map(value, fn):
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    return fn(value)


@dataclass
class Cond:
    """Everything a backbone needs besides ``(x_t, t)``."""

    text: Tensor | None = None          # encoder_hidden_states [B, L, D]
    text_mask: Tensor | None = None     # encoder attention mask [B, L] (Sana, PixArt, Wan)
    pooled: Tensor | None = None        # SDXL text_embeds, SD3/Flux pooled projections [B, D]
    added: dict[str, Tensor] = field(default_factory=dict)  # SDXL time_ids, PixArt resolution/aspect_ratio
    labels: Tensor | None = None        # class labels [B] of a class-conditional UNet2DModel
    guidance: Tensor | None = None      # Flux guidance embedding / LCM w-embedding input [B] or [B, D]

    def apply(self, fn) -> "Cond":
        """A copy with ``fn`` applied to every tensor (``.to``, indexing, ``repeat``)."""
        return Cond(**{f.name: _map(getattr(self, f.name), fn) for f in fields(self)})

    def to(self, *args, **kwargs) -> "Cond":
        return self.apply(lambda v: v.to(*args, **kwargs))

    def __getitem__(self, index) -> "Cond":
        return self.apply(lambda v: v[index])

    @staticmethod
    def cat(*conds: "Cond") -> "Cond":
        """Concatenate conds along the batch axis (cond and uncond in one backbone pass; a batch of prompts)."""
        out = {}
        for f in fields(Cond):
            vals = [getattr(c, f.name) for c in conds]
            if isinstance(vals[0], dict):
                out[f.name] = {k: torch.cat([v[k] for v in vals]) for k in vals[0]}
            elif any(v is None for v in vals):
                if not all(v is None for v in vals):
                    raise ValueError(f"cannot batch a cond with {f.name} and one without; give both or neither")
                out[f.name] = None
            else:
                out[f.name] = torch.cat(vals)
        return Cond(**out)


def sample_seed(seed: int, step: int, turn: int, index: int) -> int:
    """A 62-bit seed for one sample of one turn of one step (splitmix64 finalizer over the tuple)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + turn * 0x94D049BB133111EB + index) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) >> 2


@dataclass
class Batch:
    """One micro-batch for a method turn.

    ``seeds`` holds one seed per sample, derived from (run seed, step, turn, global sample index). Methods
    draw their randomness through ``randn_like``/``rand`` so results do not depend on how a global batch is
    split into micro-batches or processes, and a resumed run repeats an uninterrupted one exactly.
    """

    noise: Tensor                    # student input noise [B, *sample_shape]
    cond: Cond
    uncond: Cond                     # the null condition, for classifier-free guidance
    x0_real: Tensor | None = None    # real samples (GAN terms, consistency distillation)
    cond_real: Cond | None = None    # conditioning of the real samples
    seeds: Tensor | None = None      # int64 [B]

    def to(self, device) -> "Batch":
        return replace(self, noise=self.noise.to(device), cond=self.cond.to(device), uncond=self.uncond.to(device),
                       x0_real=None if self.x0_real is None else self.x0_real.to(device),
                       cond_real=None if self.cond_real is None else self.cond_real.to(device))

    def __len__(self) -> int:
        return len(self.noise)

    def subset(self, members: Tensor) -> Batch:
        """The samples ``members`` of this batch, each with its own seed (so its noise, t and eps are unchanged)."""
        def take(x):
            return None if x is None else x[members.to(x.device)]

        return replace(self, noise=take(self.noise), cond=self.cond[members], uncond=self.uncond[members],
                       x0_real=take(self.x0_real), cond_real=None if self.cond_real is None else self.cond_real[members],
                       seeds=take(self.seeds))

    def _gens(self, salt: int):
        if self.seeds is None:
            raise ValueError("this Batch has no per-sample seeds; build it with seeds=... (see fewstep.data)")
        return [torch.Generator().manual_seed(int(s) ^ (salt * 0x2545F4914F6CDD1D % 2**62)) for s in self.seeds]

    def randn_like(self, x: Tensor, salt: int) -> Tensor:
        """Standard normal noise shaped like ``x``, drawn per sample from its seed and ``salt``."""
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in self._gens(salt)]).to(x)

    def rand(self, salt: int, device=None) -> Tensor:
        """One U[0, 1) number per sample."""
        return torch.cat([torch.rand(1, generator=g) for g in self._gens(salt)]).to(device or self.noise.device)
