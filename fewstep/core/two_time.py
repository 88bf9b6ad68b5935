"""Two-time backbones: a one-time teacher ``D(x_t, t)`` grown into a flow-map student ``F(x_t, t, r)``.

A flow map jumps from time ``t`` to a target time ``r``. MeanFlow (Geng et al., arXiv 2505.13447) learns the
average velocity ``u(z_t, r, t) = 1 / (t - r) * int_r^t v(z_s, s) ds``, which at ``r = t`` is the instantaneous
velocity ``v(z_t, t)`` the teacher already predicts; a consistency model (sCM, arXiv 2410.11081) is the
``r = 0`` slice of such a map. So the student is the teacher plus one extra input, and equals it on the
diagonal ``r = t``.

Mechanism. ``attach(adapter)`` gives the diffusers model a second time embedding ``e(t - r)`` (sinusoids of
``1000 (t - r)``, then Linear-SiLU-Linear, the last layer zero-initialised) and a forward hook on the
module the adapter declares as its ``time_embedding`` (a diffusers ``TimestepEmbedding``) that adds
``e(t - r)`` to that module's output, so it enters the network exactly where the family's own timestep
embedding does (UNet resblocks, adaLN modulation of the DiTs):

    temb'(t, r) = temb(t) + e(t - r),        e(delta) = W2 silu(W1 phi(1000 delta) + b1) - (same at delta = 0)

Why ``t - r`` and not ``r``: the extra input is then the length of the jump, zero on the diagonal, and
``(t, t - r)`` is the pair MeanFlow feeds its network. An embedding of ``r`` itself would differ from the
teacher's input on the diagonal as soon as it is trained, for no gain: ``r = t - (t - r)``.
Subtracting ``e(0)`` makes the offset vanish at ``r = t`` for every value of the weights, not only at
initialisation: ``F(x_t, t, t)`` is always the backbone's own one-time prediction, the same function a call
without ``r`` computes, so the diagonal (MeanFlow's ``r = t`` samples, a flow-matching loss) trains the
shared weights alone. ``W2`` has no bias, as ``e(0)`` would cancel it. Zero ``W2`` makes the student equal
to the teacher for every ``r`` at initialisation (exactly: the hook adds an exact zero).

Parameters and saving. The embedding is a submodule of the diffusers model under ``PREFIX``, so its
parameters are in ``model.parameters()`` (hence in ``Denoiser.trainable_parameters()`` of a full student, and
in the EMA and optimizer built from them) and in ``model.state_dict()`` under keys ``fewstep_two_time.*``
(state-dict checkpoints save and load them with the student; attach before loading). A ``deepcopy`` of the
model carries the embedding and a hook bound to the copy. Export is meant
to take the ``fewstep_two_time.`` keys out of the backbone's weights, so that the diffusers folder loads
cleanly in plain diffusers, and write them with ``config()`` into a separate ``two_time/`` subfolder that
the exported pipeline re-attaches; export itself is not implemented here. A LoRA student (one shared base)
must add ``embedding_of(model).parameters()`` to its own trainable list.

The hook adds nothing unless a call sets ``t - r`` (``offset`` / ``predict`` with ``r``), so the teacher, a
critic on the same base and every existing call site compute exactly what they did before.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from fewstep.core.adapter import BackboneAdapter
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser

PREFIX = "fewstep_two_time"     # attribute of the diffusers model holding the embedding; state-dict key prefix
DELTA_SCALE = 1000.0            # t is in [0, 1]; the teachers' own sinusoids see timesteps in [0, 1000]


class TimeOffsetEmbedding(nn.Module):
    """``e(delta)``, ``delta = t - r``: a zero-initialised embedding of the jump that vanishes at ``delta = 0``."""

    def __init__(self, dim: int, channels: int = 256, hidden: int | None = None, max_period: float = 10000.0):
        super().__init__()
        self.dim, self.channels, self.max_period = dim, channels, max_period
        self.linear_1 = nn.Linear(channels, hidden or dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden or dim, dim, bias=False)
        nn.init.zeros_(self.linear_2.weight)   # the student starts as the teacher
        self.delta: Tensor | None = None       # t - r of the call in flight; None: the hook adds nothing

    def config(self) -> dict:
        """What rebuilds the module (with the declared ``time_embedding`` path, what export would write)."""
        return {"dim": self.dim, "channels": self.channels, "hidden": self.linear_1.out_features,
                "max_period": self.max_period, "delta_scale": DELTA_SCALE}

    def sinusoids(self, delta: Tensor) -> Tensor:
        """``[cos, sin](DELTA_SCALE * delta * f_i)``, ``f_i = max_period^(-i / half)``, in float32 (time maths)."""
        half = self.channels // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=delta.device) / half)
        arg = DELTA_SCALE * delta.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)

    def forward(self, delta: Tensor) -> Tensor:
        """``e(delta) - e(0)`` ``[B, dim]``; one pass over the batch and the zero row."""
        phi = self.sinusoids(torch.cat([delta.reshape(-1), delta.new_zeros(1)]))
        e = self.linear_2(self.act(self.linear_1(phi.to(self.linear_1.weight.dtype))))
        return e[:-1] - e[-1:]

    def hook(self, _module, _inputs, out: Tensor):
        """Forward hook on the backbone's time embedding: ``temb(t) + e(t - r)`` while an offset is set."""
        if self.delta is None:
            return None
        if len(self.delta) != len(out):
            raise ValueError(f"t - r has {len(self.delta)} entries but the time embedding has batch {len(out)}; "
                             "give r per sample of the backbone call (a CFG-doubled batch needs r doubled too)")
        return out + self(self.delta.to(out.device)).to(out.dtype)


def embedding_of(model: nn.Module) -> TimeOffsetEmbedding | None:
    """The two-time embedding attached to a diffusers model, or None."""
    embedding = getattr(model, PREFIX, None)
    return embedding if isinstance(embedding, TimeOffsetEmbedding) else None


def attach(backbone: BackboneAdapter, hidden: int | None = None) -> TimeOffsetEmbedding:
    """Make ``backbone``'s model a two-time model (idempotent: an attached model keeps its embedding).

    The embedding is built in the dtype and on the device of the hooked time embedding, its width read from
    that ``TimestepEmbedding``'s ``linear_2``. ``hidden``: width of the embedding MLP (default: that width,
    as diffusers' ``TimestepEmbedding``).
    """
    model = backbone.model
    existing = embedding_of(model)
    if existing is not None:
        return existing
    if backbone.time_embedding is None:
        raise ValueError(f"{type(backbone).__name__} declares no time_embedding module: two-time students need "
                         "the submodule whose output is the timestep embedding")
    module = model.get_submodule(backbone.time_embedding)
    if not isinstance(getattr(module, "linear_2", None), nn.Linear):
        raise TypeError(f"{type(backbone).__name__}.time_embedding = {backbone.time_embedding!r} is a "
                        f"{type(module).__name__}, not a diffusers TimestepEmbedding (linear_1, act, linear_2)")
    weight = module.linear_2.weight
    embedding = TimeOffsetEmbedding(module.linear_2.out_features, hidden=hidden).to(weight.device, weight.dtype)
    model.add_module(PREFIX, embedding)
    module.register_forward_hook(embedding.hook)
    return embedding


def _batch(v, n: int, device) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float32, device=device).expand(n)


@contextmanager
def offset(backbone: BackboneAdapter, t, r, n: int):
    """Backbone calls inside the block see the target time ``r`` (per sample, ``n`` of them) beside ``t``."""
    embedding = embedding_of(backbone.model)
    if embedding is None:
        raise ValueError(f"{type(backbone.model).__name__} is a one-time model: fewstep.core.two_time.attach its "
                         "adapter before calling it with a target time r")
    device = next(embedding.parameters()).device
    previous, embedding.delta = embedding.delta, _batch(t, n, device) - _batch(r, n, device)
    try:
        yield
    finally:
        embedding.delta = previous


def predict(denoiser: Denoiser, x_t: Tensor, t, cond: Cond, r=None, out: str = "sample", dtype=torch.float32) -> Tensor:
    """``F(x_t, t, r)`` as an output of type ``out``: ``denoiser(x_t, t, cond, out, dtype)`` with target time
    ``r``; ``r=None`` is the plain call (on a two-time model, the same as ``r = t``).

    The backbone's raw output keeps the teacher's prediction type at ``(x_t, t)``, so ``out`` converts it as
    for the teacher: for a flow teacher, ``flow_prediction`` is MeanFlow's average velocity ``u(z_t, r, t)``
    and the jump is ``z_r = z_t - (t - r) u``; ``sample`` (``x_t - t u``) is that jump only at ``r = 0``.
    """
    if r is None:
        return denoiser(x_t, t, cond, out, dtype)
    denoiser.schedule.check_t(torch.as_tensor(r))
    with offset(denoiser.backbone, t, r, len(x_t)):
        return denoiser(x_t, t, cond, out, dtype)
