"""Adapter for diffusers ``FluxTransformer2DModel`` (Flux.1 dev/schnell, rectified flow).

Exactly what ``FluxPipeline`` does around the model call:

- latents ``[B, C, H, W]`` are packed into 2x2 patches, ``[B, (H/2)(W/2), 4C]`` (``_pack_latents``), and the
  output is unpacked the same way back (``_unpack_latents``);
- ``img_ids`` ``[(H/2)(W/2), 3]`` hold (0, row, column) of each patch; ``txt_ids`` come from
  ``encode_prompt`` (zeros ``[L, 3]``); fewstep keeps them per sample in ``Cond.added["txt_ids"]``
  ``[B, L, 3]`` so a Cond can be batched and indexed, and passes the first row (ids are shared);
- the pipeline passes ``timestep / 1000`` (the model multiplies by 1000 again), i.e. ``t`` itself;
- guidance-distilled models (``guidance_embeds``, Flux.1-dev) take ``guidance`` = the guidance scale
  (``Cond.guidance``, ``[B]``); the model multiplies it by 1000 too.

The output is the flow velocity ``u = eps - x0`` (``flow_prediction``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fewstep.backbones.base import TokenAdapter
from fewstep.core.conditioning import Cond


def pack(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]``, channels of each 2x2 patch ordered (c, dy, dx)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of ``pack`` for latents of height ``h`` and width ``w``."""
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """Position ids ``[h * w, 3]`` = (0, row, column) of each packed patch, row-major."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)
    return ids.to(device=device, dtype=dtype)


class FluxAdapter(TokenAdapter):
    """``FluxTransformer2DModel`` on packed latents; the tapped block is the middle of the double-stream then
    single-stream stack."""

    # joint blocks also project the text stream; Flux single blocks have their own MLP projections
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "proj_mlp", "proj_out")

    stream = 1      # both block types return (encoder_hidden_states, hidden_states)
    time_embedding = "time_text_embed.timestep_embedder"   # summed with the guidance and pooled-text embeddings

    def __init__(self, model, prediction_type: str):
        super().__init__(model, prediction_type)
        n_double = len(model.transformer_blocks)
        mid = (n_double + len(model.single_transformer_blocks)) // 2
        self.feature_modules = (f"transformer_blocks.{mid}" if mid < n_double
                                else f"single_transformer_blocks.{mid - n_double}",)

    def model_timestep(self, timestep):
        return timestep / 1000

    def forward(self, x_t, timestep, cond: Cond):
        b, _, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux packs latents into 2x2 patches: height and width must be even, got {h}x{w}")
        if cond.text is None or cond.pooled is None:
            raise ValueError("Flux needs Cond(text=prompt_embeds, pooled=pooled_prompt_embeds); build it with "
                             "fewstep.encoders.PromptEncoder(pipe)")
        guidance = None
        if self.model.config.guidance_embeds:
            if cond.guidance is None:
                raise ValueError("this Flux model is guidance-distilled (guidance_embeds=True): give "
                                 "Cond(guidance=<guidance scale per sample>), e.g. 3.5 as FluxPipeline's default")
            guidance = cond.guidance.to(x_t.device, torch.float32).expand(b)
        txt_ids = cond.added.get("txt_ids")
        txt_ids = txt_ids[0] if txt_ids is not None else x_t.new_zeros(cond.text.shape[1], 3)
        self.grid = (h // 2, w // 2)
        out = self.model(hidden_states=pack(x_t), timestep=self.model_timestep(timestep.to(x_t.device, x_t.dtype)),
                         guidance=guidance, pooled_projections=self.cast(cond.pooled, x_t),
                         encoder_hidden_states=self.cast(cond.text, x_t), txt_ids=self.cast(txt_ids, x_t),
                         img_ids=image_ids(h // 2, w // 2, x_t.device, x_t.dtype), return_dict=False)[0]
        return unpack(out, h, w)
