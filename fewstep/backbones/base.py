"""The base of the diffusers adapters: the core interface plus LoRA roles on a peft-injected model, and the
token-grid base of the transformer families."""
from __future__ import annotations

from contextlib import nullcontext

from torch import Tensor, nn

from fewstep.backbones import lora
from fewstep.core.adapter import BackboneAdapter


class DiffusersAdapter(BackboneAdapter):
    """A diffusers model whose LoRA roles (student, critic; the teacher is the base) are peft adapters."""

    def role(self, adapter: str | bool | None):
        return nullcontext() if adapter is None else lora.role(self.model, adapter)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return lora.adapter_parameters(self.model, name)

    def merged_weights(self, name: str) -> dict[str, Tensor]:
        return lora.merged_weights(self.model, name)


class TokenAdapter(DiffusersAdapter):
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
