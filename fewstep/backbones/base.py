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
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")   # attention projections

    def __init__(self, model: nn.Module, prediction_type: str):
        super().__init__()
        self.model = model
        self.prediction_type = prediction_type

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def forward(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def cast(self, v: Tensor | None, like: Tensor) -> Tensor | None:
        """A floating cond tensor in the backbone's dtype on ``like``'s device (stock pipelines cast the
        prompt embeddings to the transformer's dtype); masks and ids keep their dtype."""
        if v is None:
            return None
        return v.to(like.device, self.dtype) if v.is_floating_point() else v.to(like.device)

    def feature_channels(self) -> int:
        """Channels of the last tapped feature (sizes the discriminator head)."""
        raise NotImplementedError

    def feature_map(self, out) -> Tensor:
        """A tapped module's output as a feature map ``[B, C, *spatial]``; a tuple gives its first tensor
        (UNet blocks). Transformer adapters override this to pick the image tokens and lay them on the grid."""
        return out[0] if isinstance(out, tuple) else out

    @contextmanager
    def tap(self):
        """Collect the outputs of ``feature_modules`` (as ``feature_map``s) during the forward passes run
        inside the block."""
        feats: list[Tensor] = []
        hooks = []
        for name in self.feature_modules:
            module = self.model.get_submodule(name)
            hooks.append(module.register_forward_hook(lambda _m, _i, out: feats.append(self.feature_map(out))))
        try:
            yield feats
        finally:
            for h in hooks:
                h.remove()


class TokenAdapter(BackboneAdapter):
    """Base of the transformer adapters (SD3, Flux, PixArt, Sana, Wan).

    The tapped module is the middle block of ``blocks`` (a mid-depth block, as GAN heads on DiTs use).
    A block's output is a token sequence ``[B, N, D]`` (dual-stream blocks return ``(text, image)``;
    ``stream`` picks the image tokens), which ``feature_map`` lays out on the latent token grid that
    ``forward`` records in ``self.grid``, giving ``[B, D, *grid]`` like a UNet feature map.
    """

    blocks = "transformer_blocks"   # the ModuleList of the model's blocks
    stream: int | None = None       # index of the image tokens in a block's tuple output

    def __init__(self, model: nn.Module, prediction_type: str):
        super().__init__(model, prediction_type)
        self.grid: tuple[int, ...] = ()
        self.feature_modules = (f"{self.blocks}.{len(model.get_submodule(self.blocks)) // 2}",)

    def feature_map(self, out) -> Tensor:
        tokens = out[self.stream] if isinstance(out, tuple) else out
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)

    def feature_channels(self) -> int:
        return self.model.config.num_attention_heads * self.model.config.attention_head_dim
