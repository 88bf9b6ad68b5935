"""Adapter for diffusers ``UNet2DConditionModel`` (SD1.5/2.1 and SDXL call signatures)."""
from __future__ import annotations

from fewstep.backbones.base import DiffusersAdapter
from fewstep.core.conditioning import Cond


class UNet2DConditionAdapter(DiffusersAdapter):
    """``UNet2DConditionModel(x_t, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond)``.

    SDXL's ``added_cond_kwargs`` are ``{"text_embeds": pooled, "time_ids": ...}``: ``Cond.pooled`` fills
    ``text_embeds`` and ``Cond.added`` carries ``time_ids``. ``Cond.guidance`` is LCM's w-embedding input
    (``timestep_cond``).
    """

    feature_modules = ("mid_block",)
    time_embedding = "time_embedding"

    def forward(self, x_t, timestep, cond: Cond):
        added = {k: self.cast(v, x_t) for k, v in cond.added.items()}
        if cond.pooled is not None:
            added["text_embeds"] = self.cast(cond.pooled, x_t)
        return self.model(x_t, timestep.to(x_t.device), encoder_hidden_states=self.cast(cond.text, x_t),
                          encoder_attention_mask=cond.text_mask, added_cond_kwargs=added or None,
                          timestep_cond=self.cast(cond.guidance, x_t), return_dict=False)[0]

    def feature_channels(self) -> int:
        return self.model.config.block_out_channels[-1]
