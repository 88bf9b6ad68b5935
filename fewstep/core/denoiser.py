"""Denoiser: a backbone adapter plus a noise process, as a predictor in any output space.

``D(x_t, t, cond, out)`` with continuous ``t`` in [0, 1]; ``out`` is one of ``sample`` (x0),
``epsilon``, ``v_prediction``, ``flow_prediction``. The backbone runs in its own dtype (bf16 allowed);
time and schedule maths run in float32 and the conversion between output types in float64, as the official
DMD2 does (at low noise the difference of two x0 estimates loses digits in float32). The call never wraps
``no_grad``: SiD backpropagates through frozen teacher and critic (arXiv 2404.04057).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.core.adapter import BackboneAdapter, FeaturesTaken
from fewstep.core.conditioning import Cond
from fewstep.core.parameterization import convert
from fewstep.core.schedules import NoiseSchedule


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
            return self.backbone.adapter_parameters(self.adapter)
        if self.adapter is False:
            return []
        return list(self.backbone.model.parameters())

    def role(self):
        """Activate this denoiser's LoRA role for the duration of a call."""
        return self.backbone.role(self.adapter)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond, out: str = "sample", dtype=torch.float32) -> Tensor:
        """The prediction of type ``out`` at ``(x_t, t)``, converted in float64 and returned as ``dtype``."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(len(x_t))
        self.schedule.check_t(t)
        with self.role():
            raw = self.backbone(x_t.to(self.backbone.dtype), self.schedule.timestep(t), cond)
        return convert(raw.double(), x_t.double(), t, self.schedule, self.prediction_type, out).to(dtype)

    def features(self, x_t: Tensor, t: Tensor, cond: Cond) -> list[Tensor]:
        """The backbone's tapped features at ``(x_t, t)``, the pass ending at the last tapped module when the
        backbone allows it: a discriminator's real-image pass reads only the bottleneck (DMD2 section 4.2), so
        the decoder half of the network and its backward are not run. Features and their gradients are those
        of the whole pass."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(len(x_t))
        self.schedule.check_t(t)
        with self.role(), self.backbone.tap(stop=self.backbone.can_stop_early()) as feats:
            try:
                self.backbone(x_t.to(self.backbone.dtype), self.schedule.timestep(t), cond)
            except FeaturesTaken:
                pass
        return feats
