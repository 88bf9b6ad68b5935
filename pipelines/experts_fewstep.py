"""FewStepExperts: several backbones of one diffusers class behind one component, switched by timestep.

A phased student (Phased DMD, arXiv 2510.27684) has one expert per phase of its t-list. Stock text-to-image
pipelines hold one backbone (``unet`` or ``transformer``); this model takes its place and forwards each call to
the expert whose phase the call's timestep falls in, so the stock pipeline samples the phased student
unchanged. ``expert_boundaries`` are descending, in the units the pipeline passes to its backbone: expert k
runs where exactly k boundaries lie at or above the timestep. Reading ``config`` gives the first expert's
config (what pipelines look up: ``in_channels``, ``sample_size``, ...) overlaid with this model's own keys,
and attributes it lacks are read from the first expert.

This file imports only torch and diffusers so that it can be copied alone into an exported pipeline folder
(``<component>/experts_fewstep.py``) and loaded with ``trust_remote_code=True``.
"""

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class FewStepExperts(ModelMixin, ConfigMixin):
    """``num_experts`` models of class ``expert_class`` (each built from ``expert_config``), chosen by timestep."""

    @register_to_config
    def __init__(self, expert_class: str = "UNet2DConditionModel", expert_config: dict = None, num_experts: int = 1,
                 expert_boundaries: list = None):
        super().__init__()
        model_cls = getattr(diffusers, expert_class, None)
        if model_cls is None:
            raise ValueError(f"expert_class={expert_class!r} is not a diffusers model class")
        bounds = [float(b) for b in expert_boundaries or []]
        if len(bounds) != num_experts - 1 or any(b <= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"expert_boundaries={expert_boundaries} must list {num_experts - 1} descending timesteps")
        config = {k: v for k, v in dict(expert_config or {}).items() if not k.startswith("_")}
        self.experts = torch.nn.ModuleList([model_cls.from_config(config) for _ in range(num_experts)])
        self.bounds = bounds

    @property
    def config(self) -> FrozenDict:
        # pipelines read backbone fields (in_channels, sample_size, guidance_embeds, ...) from config
        return FrozenDict({**self.experts[0].config, **self._internal_dict})

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            experts = self.__dict__.get("_modules", {}).get("experts")
            if experts is None or name.startswith("_"):
                raise
            return getattr(experts[0], name)     # e.g. SDXL's unet.add_embedding

    def expert_for(self, timestep) -> int:
        t = float(torch.as_tensor(timestep).flatten()[0])
        return sum(t <= b for b in self.bounds)

    def forward(self, *args, **kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        return self.experts[self.expert_for(timestep)](*args, **kwargs)
