"""Exponential moving average of a list of parameters (Polyak averaging), with state_dict support.

Tracking a parameter list rather than a module copy keeps LoRA students cheap: only the adapter
weights are averaged.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after each update of the tracked parameters.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so the random-ish early
    weights do not dominate the average.
    """

    def __init__(self, params, decay: float = 0.99):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - d)
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

    def state_dict(self) -> dict:
        """Whole CPU copies of the shadows (gathered from every rank when they are FSDP shards: a collective)."""
        from .distributed import gather_tensors

        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": gather_tensors(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        """Load whole shadows; each rank keeps its own shard where the shadows are FSDP shards."""
        from .distributed import scatter_tensors

        self.decay, self.num_updates = state["decay"], state["num_updates"]
        scatter_tensors(self.shadow, state["shadow"])
