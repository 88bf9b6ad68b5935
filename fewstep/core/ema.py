"""Exponential moving average of a list of parameters (Polyak averaging), with state_dict support.

Tracking a parameter list rather than a module copy keeps LoRA students cheap: only the adapter
weights are averaged. Shadows of FSDP-sharded parameters are shards themselves (DTensors): ``state_dict``
gathers them whole and ``load_state_dict`` keeps each rank's shard.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after each update of the tracked parameters.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the first updates (n counts the updates
    made before this one, from ``num_updates``), so the random-ish early weights do not dominate the average.
    """

    def __init__(self, params, decay: float = 0.99, num_updates: int = 0):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.num_updates = num_updates

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ps = [p.detach() for p in self.params]
        if all(p.dtype == s.dtype and p.device == s.device and not hasattr(p, "full_tensor")
               for s, p in zip(self.shadow, ps)):
            torch._foreach_lerp_(self.shadow, ps, 1 - d)     # one call, not a Python loop over every tensor
        else:
            for s, p in zip(self.shadow, ps):
                s.lerp_(p.float(), 1 - d)
        self.num_updates += 1

    @contextmanager
    @torch.no_grad()
    def swapped(self):
        """Temporarily load the averaged weights into the tracked parameters (sampling, export)."""
        saved = [p.detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            for s, p in zip(saved, self.params):
                p.copy_(s)

    def copy_to(self, params) -> None:
        """Write the averaged weights into ``params`` (e.g. those of a copy of the model)."""
        with torch.no_grad():
            for s, p in zip(self.shadow, params):
                p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        """Whole CPU copies of the shadows (gathered from every rank when they are FSDP shards: a collective)."""
        shadow = [(s.full_tensor() if isinstance(s, DTensor) else s).detach().cpu().clone() for s in self.shadow]
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load whole shadows; each rank keeps its own shard where the shadows are FSDP shards."""
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        for d, f in zip(self.shadow, state["shadow"]):
            if isinstance(d, DTensor):
                # src_data_rank=None: every rank holds the full tensor, so each slices its own shard
                d.copy_(distribute_tensor(f.to(device=d.device, dtype=d.dtype), d.device_mesh, d.placements,
                                          src_data_rank=None))
            else:
                d.copy_(f)
