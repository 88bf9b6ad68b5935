"""Adapter for diffusers ``PixArtTransformer2DModel`` (PixArt-alpha / -sigma, VP epsilon).

``PixArtAlphaPipeline`` calls ``transformer(latents, encoder_hidden_states=prompt_embeds,
encoder_attention_mask=prompt_attention_mask, timestep=t, added_cond_kwargs=...)`` with the integer
DDPM timestep (``schedule.timestep(t)``), then keeps the first C output channels when the model has a
learned variance (``out_channels == 2 * in_channels``). ``added_cond_kwargs`` holds the 1024 px model's
micro-conditions ``resolution`` ``[B, 2]`` and ``aspect_ratio`` ``[B, 1]`` (``Cond.added``).
"""
from __future__ import annotations

from fewstep.backbones.base import TokenAdapter
from fewstep.core.conditioning import Cond


class PixArtAdapter(TokenAdapter):
    """``PixArtTransformer2DModel`` with the learned-sigma half of the output dropped."""

    time_embedding = "adaln_single.emb.timestep_embedder"   # before the size embeddings and adaLN-single

    def forward(self, x_t, timestep, cond: Cond):
        added = {k: self.cast(v, x_t) for k, v in cond.added.items()} or None
        if self.model.use_additional_conditions and added is None:
            raise ValueError("this PixArt model uses resolution/aspect-ratio micro-conditions: give "
                             "Cond(added={'resolution': [B, 2], 'aspect_ratio': [B, 1]}) (PromptEncoder does)")
        p = self.model.config.patch_size
        self.grid = (x_t.shape[-2] // p, x_t.shape[-1] // p)
        out = self.model(x_t, encoder_hidden_states=self.cast(cond.text, x_t),
                         encoder_attention_mask=self.cast(cond.text_mask, x_t), timestep=timestep.to(x_t.device),
                         added_cond_kwargs=added, return_dict=False)[0]
        c = x_t.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out
