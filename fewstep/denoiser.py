"""Denoiser: a backbone adapter plus a noise process, as a predictor in any output space.

``D(x_t, t, cond, out)`` with continuous ``t`` in [0, 1]; ``out`` is one of ``sample`` (x0),
``epsilon``, ``v_prediction``, ``flow_prediction``. The backbone runs in its own dtype (bf16 allowed);
time, schedule and conversion maths run in float32 (DESIGN.md section 5). The call never wraps
``no_grad``: SiD backpropagates through frozen teacher and critic (arXiv 2404.04057).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from . import lora
from .backbones import BackboneAdapter
from .conditioning import Cond
from .parameterization import convert
from .schedules import NoiseSchedule


class Denoiser(nn.Module):
    """Any diffusers backbone + noise process as an x0 / eps / v / flow predictor.

    ``adapter`` selects a role on a LoRA-shared backbone: ``None`` calls the model as it is,
    a name activates that peft adapter, ``False`` runs the frozen base with every adapter disabled
    (the teacher in ``lora`` mode).
    """

    def __init__(self, backbone: BackboneAdapter, schedule: NoiseSchedule, adapter: str | bool | None = None):
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule
        self.adapter = adapter

    @property
    def prediction_type(self) -> str:
        return self.backbone.prediction_type

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters this role trains: its own LoRA adapter on a shared base, else every parameter."""
        if isinstance(self.adapter, str):
            return lora.adapter_parameters(self.backbone.model, self.adapter)
        if self.adapter is False:
            return []
        return list(self.backbone.model.parameters())

    def role(self):
        """Activate this denoiser's LoRA role for the duration of a call."""
        return nullcontext() if self.adapter is None else lora.role(self.backbone.model, self.adapter)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond, out: str = "sample") -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(len(x_t))
        with self.role():
            raw = self.backbone(x_t.to(self.backbone.dtype), self.schedule.timestep(t), cond)
        return convert(raw.float(), x_t.float(), t, self.schedule, self.prediction_type, out)
