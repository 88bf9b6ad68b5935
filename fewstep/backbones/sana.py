"""Adapter for diffusers ``SanaTransformer2DModel`` (Sana, rectified flow).

``SanaPipeline`` calls ``transformer(latents, encoder_hidden_states=prompt_embeds,
encoder_attention_mask=prompt_attention_mask, timestep=t * config.timestep_scale)`` with ``t`` the
scheduler's timestep (``schedule.timestep(t)``), then, like PixArt, keeps the first C output channels of
a learned-variance model. Guidance-embedded models (Sana-Sprint) take ``guidance_scale *
config.guidance_embeds_scale``; ``Cond.guidance`` holds the guidance scale.
"""
from __future__ import annotations

import torch

from fewstep.backbones.base import TokenAdapter
from fewstep.core.conditioning import Cond


class SanaAdapter(TokenAdapter):
    """``SanaTransformer2DModel(x_t, encoder_hidden_states=Cond.text, encoder_attention_mask=Cond.text_mask)``."""

    @property
    def time_embedding(self) -> str:
        # guidance-embedded models sum a timestep and a guidance embedding; the others use adaLN-single
        guided = self.model.config.guidance_embeds
        return "time_embed.timestep_embedder" if guided else "time_embed.emb.timestep_embedder"

    def model_timestep(self, timestep):
        return timestep * self.model.config.timestep_scale

    def forward(self, x_t, timestep, cond: Cond):
        config = self.model.config
        guidance = None
        if config.guidance_embeds:
            if cond.guidance is None:
                raise ValueError("this Sana model has a guidance embedding: give Cond(guidance=<guidance scale>)")
            guidance = cond.guidance.to(x_t.device, torch.float32).expand(len(x_t)).to(x_t.dtype)
            guidance = guidance * config.guidance_embeds_scale
        self.grid = (x_t.shape[-2] // config.patch_size, x_t.shape[-1] // config.patch_size)
        out = self.model(x_t, encoder_hidden_states=self.cast(cond.text, x_t),
                         encoder_attention_mask=self.cast(cond.text_mask, x_t),
                         timestep=self.model_timestep(timestep.to(x_t.device)), guidance=guidance,
                         return_dict=False)[0]
        c = x_t.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out
