"""Adapter for diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5, rectified flow).

``StableDiffusion3Pipeline`` calls ``transformer(hidden_states=latents, timestep=t, encoder_hidden_states=
prompt_embeds, pooled_projections=pooled_prompt_embeds)`` with ``t = sigma * 1000`` straight from
``FlowMatchEulerDiscreteScheduler.timesteps``, which is ``schedule.timestep(t)``: no conversion here.
The output is the flow velocity ``u = eps - x0`` (``flow_prediction``).
"""
from __future__ import annotations

from fewstep.backbones.base import TokenAdapter
from fewstep.core.conditioning import Cond


class SD3Adapter(TokenAdapter):
    """``SD3Transformer2DModel(x_t, timestep, encoder_hidden_states=Cond.text, pooled_projections=Cond.pooled)``."""

    # joint blocks also project the text stream; Flux single blocks have their own MLP projections
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    stream = 1      # JointTransformerBlock returns (encoder_hidden_states, hidden_states)
    time_embedding = "time_text_embed.timestep_embedder"   # summed with the pooled-text embedding after

    def forward(self, x_t, timestep, cond: Cond):
        if cond.text is None or cond.pooled is None:
            raise ValueError("SD3 needs Cond(text=prompt_embeds, pooled=pooled_prompt_embeds); build it with "
                             "fewstep.encoders.PromptEncoder(pipe)")
        p = self.model.config.patch_size
        self.grid = (x_t.shape[-2] // p, x_t.shape[-1] // p)
        return self.model(hidden_states=x_t, timestep=timestep.to(x_t.device),
                          encoder_hidden_states=self.cast(cond.text, x_t),
                          pooled_projections=self.cast(cond.pooled, x_t), return_dict=False)[0]
