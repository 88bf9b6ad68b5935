"""Adapter for diffusers ``WanTransformer3DModel`` (Wan 2.1 text-to-video, rectified flow).

Latents are videos ``[B, C, F, H, W]``. ``WanPipeline`` calls ``transformer(hidden_states=latents,
timestep=t, encoder_hidden_states=prompt_embeds)`` with ``t`` the scheduler's timestep
(``schedule.timestep(t)``). The model takes no attention mask: the pipeline zero-fills the prompt
embeddings past each prompt's length instead, so a ``Cond.text_mask`` given here is applied the same way.
Not covered: Wan 2.2's second (low-noise) expert and per-token timesteps (``expand_timesteps``).
"""
from __future__ import annotations

from fewstep.backbones.base import TokenAdapter
from fewstep.core.conditioning import Cond


class WanAdapter(TokenAdapter):
    """``WanTransformer3DModel``; features are ``[B, D, F', H', W']`` on the patch grid."""

    blocks = "blocks"
    time_embedding = "condition_embedder.time_embedder"

    def forward(self, x_t, timestep, cond: Cond):
        if x_t.ndim != 5:
            raise ValueError(f"Wan latents are videos [B, C, F, H, W], got shape {tuple(x_t.shape)}")
        text = self.cast(cond.text, x_t)
        if cond.text_mask is not None:
            text = text * cond.text_mask.to(text)[..., None]
        pt, ph, pw = self.model.config.patch_size
        self.grid = (x_t.shape[2] // pt, x_t.shape[3] // ph, x_t.shape[4] // pw)
        return self.model(hidden_states=x_t, timestep=timestep.to(x_t.device), encoder_hidden_states=text,
                          return_dict=False)[0]
