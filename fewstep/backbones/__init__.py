"""Backbone adapters, looked up by the diffusers class name of the model."""
from __future__ import annotations

from .base import BackboneAdapter
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter
from .toy import ToyAdapter
from .unet2d import UNet2DAdapter
from .unet2d_condition import UNet2DConditionAdapter
from .wan import WanAdapter

ADAPTERS: dict[str, type[BackboneAdapter]] = {
    "UNet2DModel": UNet2DAdapter,
    "UNet2DConditionModel": UNet2DConditionAdapter,
    "SD3Transformer2DModel": SD3Adapter,
    "FluxTransformer2DModel": FluxAdapter,
    "PixArtTransformer2DModel": PixArtAdapter,
    "SanaTransformer2DModel": SanaAdapter,
    "WanTransformer3DModel": WanAdapter,
    "ToyGMMModel": ToyAdapter,
}


def adapter_for(model, prediction_type: str) -> BackboneAdapter:
    """Wrap a diffusers model in the adapter for its family."""
    name = type(model).__name__
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model, prediction_type)
    raise ValueError(f"no fewstep adapter for {name}; supported backbones: {', '.join(sorted(ADAPTERS))}")


__all__ = ["ADAPTERS", "BackboneAdapter", "adapter_for"]
