"""Backbone adapters, one per diffusers model family, registered with ``fewstep.core.adapter`` by class name."""
from __future__ import annotations

from fewstep.backbones.flux import FluxAdapter
from fewstep.backbones.pixart import PixArtAdapter
from fewstep.backbones.sana import SanaAdapter
from fewstep.backbones.sd3 import SD3Adapter
from fewstep.backbones.unet2d import UNet2DAdapter
from fewstep.backbones.unet2d_condition import UNet2DConditionAdapter
from fewstep.backbones.wan import WanAdapter
from fewstep.core.adapter import ADAPTERS, BackboneAdapter, adapter_for, register_adapter

for _name, _adapter in {
    "UNet2DModel": UNet2DAdapter,
    "UNet2DConditionModel": UNet2DConditionAdapter,
    "SD3Transformer2DModel": SD3Adapter,
    "FluxTransformer2DModel": FluxAdapter,
    "PixArtTransformer2DModel": PixArtAdapter,
    "SanaTransformer2DModel": SanaAdapter,
    "WanTransformer3DModel": WanAdapter,
}.items():
    register_adapter(_name, _adapter)

__all__ = ["ADAPTERS", "BackboneAdapter", "adapter_for", "register_adapter"]
