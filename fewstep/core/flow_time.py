"""A teacher's noise process seen on the rectified-flow path ``z_t = (1 - t) x + t e``: the exact time map and
velocity that MeanFlow (arXiv 2505.13447), sCM's TrigFlow (arXiv 2410.11081) and TwinFlow (arXiv 2512.05150) read a
VP or flow teacher through.

A process ``x_s = alpha_s x + sigma_s e`` holds ``x_s / (alpha_s + sigma_s) = (1 - t) x + t e`` with
``t = sigma_s / (alpha_s + sigma_s)``: the flow state at flow time t is ``z_t = x_s / (alpha_s + sigma_s)``, and the
velocity is ``u = eps - x0`` of the (x0, eps) a prediction implies. For VP (``alpha^2 + sigma^2 = 1``)
``alpha_s + sigma_s = 1 / sqrt((1 - t)^2 + t^2)``; ``FlowTime.process_time`` inverts fewstep's piecewise-linear
``log alpha_bar`` in float64, so the teacher's own interpolated process gives exactly that SNR. Flow teachers: the
identity map.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.guidance import cfg as guided
from fewstep.core.schedules import NoiseSchedule, bcast
from fewstep.core.two_time import offset
from fewstep.errors import ConfigError


class FlowTime:
    """A teacher's process seen on MeanFlow's path ``z_t = (1 - t) x + t e`` (module docstring): flow time t <->
    process time s, state ``x_s = scale(t) z_t``, and the velocity ``eps - x0`` of a prediction."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str):
        if schedule.kind not in ("vp", "flow") or (schedule.kind == "vp" and prediction_type == "flow_prediction"):
            raise ConfigError(f"a flow-path student (MeanFlow, sCM, TwinFlow) needs a VP (epsilon / v / sample) or rectified-flow teacher; this one is "
                              f"{schedule.kind} with {prediction_type}")
        self.schedule, self.kind = schedule, prediction_type
        self.lo, self.hi = (float(v) for v in self.of(torch.tensor([0.0, 1.0])))

    def of(self, s: Tensor) -> Tensor:
        """The flow time ``sigma_s / (alpha_s + sigma_s)`` of process time s (float64)."""
        a, sg = self.schedule.alpha(s, torch.float64), self.schedule.sigma(s, torch.float64)
        return sg / (a + sg)

    def scale(self, t: Tensor) -> Tensor:
        """``alpha_s + sigma_s`` at flow time t: ``x_s = scale z_t``."""
        t = t.double()
        return torch.ones_like(t) if self.schedule.kind == "flow" else ((1 - t) ** 2 + t ** 2).rsqrt()

    def process_time(self, t: Tensor) -> Tensor:
        """The process time s whose SNR is flow time t's: VP inverts the linear interpolation of ``log alpha_bar``
        (differentiable in t: the segment index is piecewise constant)."""
        if self.schedule.kind == "flow":
            return t
        t, table = t.double(), self.schedule.log_abar.to(t.device)
        log_abar = 2 * torch.log1p(-t) - torch.log((1 - t) ** 2 + t ** 2)
        lo = (torch.searchsorted(-table, -log_abar.detach()) - 1).clamp(0, len(table) - 2)
        k = lo + (log_abar - table[lo]) / (table[lo + 1] - table[lo])
        return (k / (len(table) - 1)).clamp(0, 1).float()

    def velocity(self, raw: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """``u = eps - x0`` of a backbone output ``raw`` at ``(x_s, s)``, float64 (x0 and eps in the flow's own
        alpha = (1 - t) scale, sigma = t scale)."""
        if self.kind == "flow_prediction":
            return raw.double()
        raw, t, c = raw.double(), bcast(t.double(), z.double()), bcast(self.scale(t), z.double())
        a, sg, x = (1 - t) * c, t * c, c * z.double()
        if self.kind == "v_prediction":
            n2 = a * a + sg * sg
            return ((sg - a) * x + (a + sg) * raw) / n2
        if self.kind == "epsilon":
            return raw - (x - sg * raw) / a
        return (x - a * raw) / sg - raw


def velocity_of(d: Denoiser, ft: FlowTime, z: Tensor, t: Tensor, cond: Cond, r: Tensor | None = None,
                uncond: Cond | None = None, w: float = 1.0) -> Tensor:
    """``u(z_t, r, t)`` of denoiser d at flow times (``r=None``: its instantaneous velocity v; ``uncond``: guided
    ``v_u + w (v_c - v_u)``), float64. The offset is ``t - r`` in flow time."""
    x = bcast(ft.scale(t), z.double()) * z.double()
    s = ft.process_time(t)
    with offset(d.backbone, t, r, len(z)) if r is not None else nullcontext():
        if uncond is None:
            raw = d(x, s, cond, d.prediction_type, torch.float64)
        else:
            raw = guided(d, x, s, cond, uncond, w, d.prediction_type, torch.float64)
    return ft.velocity(raw, z, t)
