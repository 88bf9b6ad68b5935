"""Backbone adapters: one uniform call signature over diffusers model families.

An adapter knows the model's call signature and time convention, nothing about losses (k-diffusion's
``get_eps`` idea). Feature taps for discriminator heads use forward hooks, never patched forwards.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import Tensor, nn

from ..conditioning import Cond


class BackboneAdapter(nn.Module):
    """Calls one diffusers model as ``raw = adapter(x_t, timestep, cond)``.

    ``timestep`` is the value a stock diffusers pipeline passes (``schedule.timestep(t)``); an adapter
    whose model expects another scale converts it (Flux divides by 1000).
    """

    feature_modules: tuple[str, ...] = ()   # submodules tapped for GAN heads, e.g. ("mid_block",)

    def __init__(self, model: nn.Module, prediction_type: str):
        super().__init__()
        self.model = model
        self.prediction_type = prediction_type

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def forward(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def feature_channels(self) -> int:
        """Channels of the last tapped feature (sizes the discriminator head)."""
        raise NotImplementedError

    @contextmanager
    def tap(self):
        """Collect the outputs of ``feature_modules`` during the forward passes run inside the block."""
        feats: list[Tensor] = []
        hooks = []
        for name in self.feature_modules:
            module = self.model.get_submodule(name)
            hooks.append(module.register_forward_hook(lambda _m, _i, out: feats.append(
                out[0] if isinstance(out, tuple) else out)))
        try:
            yield feats
        finally:
            for h in hooks:
                h.remove()
