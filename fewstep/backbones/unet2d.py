"""Adapter for diffusers ``UNet2DModel``: pixel space, unconditional or class-conditional."""
from __future__ import annotations

from fewstep.backbones.base import DiffusersAdapter
from fewstep.core.conditioning import Cond


class UNet2DAdapter(DiffusersAdapter):
    """``UNet2DModel(x_t, timestep, class_labels=...)``; the bottleneck (``mid_block``) is tapped."""

    feature_modules = ("mid_block",)
    time_embedding = "time_embedding"

    def forward(self, x_t, timestep, cond: Cond):
        labels = cond.labels
        if self.model.config.num_class_embeds is not None and labels is None:
            raise ValueError("this UNet2DModel is class-conditional: give Cond(labels=...)")
        return self.model(x_t, timestep.to(x_t.device), class_labels=labels, return_dict=False)[0]

    def feature_channels(self) -> int:
        return self.model.config.block_out_channels[-1]
