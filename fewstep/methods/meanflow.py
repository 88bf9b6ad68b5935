"""MeanFlow distillation: Geng, Deng, Bai, Kolter and He, "Mean Flows for One-step Generative Modeling"
(arXiv 2505.13447), on the two-time student of ``fewstep.core.two_time``.

On the flow path ``z_t = (1 - t) x + t e`` the student learns the average velocity
``u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds`` (eq. 3), so ``z_r = z_t - (t - r) u(z_t, r, t)`` (eq. 4).
Implemented:

- the MeanFlow identity (eq. 6) ``u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t)`` with the total derivative
  ``d/dt u = v . d_z u + d_t u`` (eq. 8), one forward-mode pass (``torch.func.jvp`` on ``fewstep.core.jvp``'s
  continuous-time denoiser and math attention) along the tangent ``(dz, dt, dr) = (v, 1, 0)``;
- the target ``u_tgt = v - (t - r) sg(d/dt u)`` and the loss ``sg(w) ||u_theta - sg(u_tgt)||^2`` (eqs. 9-10), with
  the paper's adaptive weighting ``w = 1 / (||Delta||^2 + c)^p`` (``||Delta||^2`` the squared L2 norm of a sample's
  error, summed over its elements; p = 0 is plain l2, p = 0.5 pseudo-Huber-like);
- the paper's (r, t) sampler: two draws of a logit-normal ``lognorm(mu, sigma)`` (or uniform), the larger is t and
  the smaller r, then r = t on all but a fraction ``ratio`` of the samples (there the loss is flow matching);
- sampling: one step ``z_0 = z_1 - u(z_1, 0, 1)``; K steps along the student's t-list with pairs (t_k, t_{k+1}),
  t_K = 0 (eq. 4 applied K times).

Distillation, not training from scratch: ``v(z_t, t)`` is the frozen teacher's velocity, guided as everywhere in
fewstep (``v_u + w (v_c - v_u)``), where the paper regresses onto the conditional velocity ``e - x`` (and mixes CFG
into the target with its omega, kappa). ``z_t`` is built from real samples x (``data.images`` or digits) and noise.

A VP or flow teacher on MeanFlow's path, exactly: ``fewstep.core.flow_time.FlowTime`` (the flow time of process
time s, the state scale and the velocity ``eps - x0``). The teacher covers flow times ``[FlowTime.lo, FlowTime.hi]``
(the flow times of its t = 0 and 1; cosine VP: 0.006 .. 1 - 5e-5) and t is clamped into it; r needs no teacher and
keeps [0, t]. The offset embedding sees ``t - r`` in flow time (what MeanFlow feeds its network), the backbone its own
time s.

Sampling and export. A K-step student samples its t-list (process times s_k, flow times t_k) with pairs
(t_k, r_k = t_{k+1}), t_K = 0; any other step count n the teacher's trailing DDIM grid of n times (999, 499 for n = 2
on 1000 VP steps). In process time step k is the DDIM (eta = 0) jump to ``x_{s_{k+1}} = alpha x0 + sigma eps`` with
the (x0, eps) the student implies at (z_{t_k}, r_k), since ``z_t - (t - r)(eps - x0) = (1 - r) x0 + r eps``: the
bundled ``FewStepScheduler(renoise="ddim")``. What r adds is the constant ``e(t_k - r_k)`` on the output of the
backbone's ``TimestepEmbedding``. Two exports (``method.export``):

- ``flow_map`` (the default): the backbone as a plain diffusers model, the offset embedding ``e`` as its own small
  component (``fewstep_pipelines.flowmap_fewstep.FewStepTimeOffset``, in the scheduler's ``time_offset/``), and a
  ``FewStepScheduler`` that records each step count's t-list and flow-time (t, r) pairs for n = 1 ..
  ``method.export_steps`` and hooks ``e(t - r)`` onto the pipeline's backbone: one backbone, every step count
  (the flow map is trained on every pair r < t, so every grid is in distribution);
- ``folded``: each step's ``e(t_k - r_k)`` folded into ``linear_2.bias`` of its own plain copy of the backbone, one
  expert per step (Phased DMD's per-step experts), sampled at its K trained steps only; no custom model code at all
  (K = 1: the stock LCM / FlowMatchLCM scheduler), for runtimes that load plain diffusers models alone, at K copies
  of the backbone.

Paper facts used (arXiv 2505.13447, sections 3-4 and the Table 1 ablations; the stored copy of the paper served
only its abstract, so these are as recalled from the paper and agree with the defaults of a public
reimplementation): tangent (v, 0, 1) on (z, r, t); conditioning (t, t - r); lognorm(-0.4, 1.0) the best time
sampler; 25% of samples with r != t the best ratio; p = 1 the best weighting, c = 1e-3; one- and two-step sampling
by eq. 4.

Config fields -> paper symbols: ``guidance_scale`` = the teacher's CFG w (1 = none); ``ratio`` = the fraction of
r != t; ``time_sampler`` = the (t, r) distribution, ``time_mu`` / ``time_sigma`` = lognorm's (mu, sigma);
``weight_p`` / ``weight_c`` = p, c of the adaptive weight; ``export`` / ``export_steps``: the export above and the
largest step count the flow-map export samples. Full mode only; no GAN head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.conditioning import Batch, Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.flow_map import EXPORT_STEPS, EXPORTS, MAX_STEPS, MeanFlowStudent, check_foldable
from fewstep.core.flow_time import FlowTime, velocity_of
from fewstep.core.generator import FewStepGenerator
from fewstep.core.jvp import continuous, jvp_attention
from fewstep.core.schedules import bcast
from fewstep.core.two_time import attach
from fewstep.errors import ConfigError
from fewstep.methods.base import Method, Parts, Turn, has_real_images, require

SAMPLERS = ("logit_normal", "uniform")


@dataclass
class MeanFlowConfig:
    """MeanFlow hyperparameters (see the module docstring for the paper symbols)."""

    guidance_scale: float = 1.25
    ratio: float = 0.25
    time_sampler: str = "logit_normal"
    time_mu: float = -0.4
    time_sigma: float = 1.0
    weight_p: float = 1.0
    weight_c: float = 1e-3
    export: str = "flow_map"
    export_steps: int = EXPORT_STEPS


def meanflow_loss(u: Tensor, v: Tensor, du_dt: Tensor, t: Tensor, r: Tensor, p: float, c: float):
    """``(loss, ||Delta||^2)``: ``mean_b sg(w_b) ||Delta_b||^2``, ``Delta = u - sg(v - (t - r) du/dt)``,
    ``w = 1 / (||Delta||^2 + c)^p``, in float32."""
    u_tgt = v.float() - bcast(t - r, v.float()) * du_dt.float()
    sq = (u.float() - u_tgt.detach()).pow(2).flatten(1).sum(1)
    w = (sq.detach() + c).pow(-p)
    return (w * sq).mean(), sq


def draw_times(u1: Tensor, u2: Tensor, coin: Tensor, cfg: MeanFlowConfig) -> tuple[Tensor, Tensor]:
    """(t, r) from three U[0, 1) draws per sample: larger / smaller of two draws, r = t unless ``coin < ratio``."""
    def one(u):
        if cfg.time_sampler == "uniform":
            return u
        return torch.sigmoid(cfg.time_mu + cfg.time_sigma * math.sqrt(2) * torch.erfinv(2 * u - 1))
    a, b = one(u1), one(u2)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    return t, torch.where(coin < cfg.ratio, r, t)


class MeanFlow(Method):
    """MeanFlow distillation with one ``Turn("student")``."""

    name = "meanflow"
    Config = MeanFlowConfig
    turns = (Turn("student"),)

    @classmethod
    def build(cls, cfg: MeanFlowConfig, parts: Parts) -> MeanFlow:
        return cls(cfg, parts.teacher, parts.student())

    @classmethod
    def validate(cls, cfg: MeanFlowConfig, model, data) -> None:
        require(cfg.guidance_scale >= 0, f"method.guidance_scale {cfg.guidance_scale} must be >= 0 (uncond + w (cond "
                "- uncond); 1 = no guidance)")
        require(0 <= cfg.ratio <= 1, f"method.ratio {cfg.ratio} must be in [0, 1] (the fraction of samples with "
                "r != t)")
        require(cfg.time_sampler in SAMPLERS, f"method.time_sampler {cfg.time_sampler!r} is not known; use "
                f"{' or '.join(SAMPLERS)}")
        require(cfg.time_sigma > 0, f"method.time_sigma {cfg.time_sigma} must be > 0 (lognorm's sigma)")
        require(cfg.weight_p >= 0, f"method.weight_p {cfg.weight_p} must be >= 0 (0 = plain l2)")
        require(cfg.weight_c > 0, f"method.weight_c {cfg.weight_c} must be > 0 (w = 1 / (||Delta||^2 + c)^p)")
        require(cfg.export in EXPORTS, f"method.export {cfg.export!r} is not known; use {' or '.join(EXPORTS)}")
        require(cfg.export_steps >= 1, f"method.export_steps {cfg.export_steps} must be at least 1")
        require(model.mode == "full", "model.mode lora: a MeanFlow student exports copies of its own weights (the "
                "backbone with its offset embedding); set model.mode full")
        require(not model.gan_head, "model.gan_head true: MeanFlow has no discriminator; set model.gan_head false")
        require(cfg.export != "folded" or 1 <= len(model.student_timesteps) <= MAX_STEPS, f"model.student_timesteps "
                f"{list(model.student_timesteps)}: MeanFlow's folded export has one expert per step; use 1 to "
                f"{MAX_STEPS} steps, or method.export flow_map")
        require(has_real_images(data), f"MeanFlow builds z_t from real samples and data.source {data.source!r} has "
                "none; set data.images to a folder of real images (captions in <name>.txt), data.source images")

    def __init__(self, cfg: MeanFlowConfig, teacher: Denoiser, student: FewStepGenerator):
        super().__init__()
        self.cfg, self.teacher = cfg, teacher.requires_grad_(False)
        self.ft = FlowTime(teacher.schedule, teacher.prediction_type)
        top = float(teacher.schedule.timestep(torch.tensor(1.0)))
        first = float(student.denoiser.schedule.timestep(student.t_list[:1].cpu())[0])
        if abs(first - top) > 1e-3:
            raise ConfigError(f"model.student_timesteps starts at {first:g}: a MeanFlow student maps the noise at "
                              f"t = 1; start the list at {top:g}")
        attach(student.denoiser.backbone)
        if cfg.export == "folded":
            check_foldable(student.denoiser.backbone)
        self.student = MeanFlowStudent(student.denoiser, student.t_list, self.ft, cfg.export, cfg.export_steps)

    def trainable(self):
        return {"student": self.student.denoiser.trainable_parameters()}

    def checkpoint_modules(self):
        return {"student": self.student}

    def loss_terms(self, x: Tensor, e: Tensor, t: Tensor, r: Tensor, cond: Cond, uncond: Cond):
        """The loss of eqs. 9-10 at given data, noise and times: ``(loss, logs)``."""
        t = t.clamp(self.ft.lo, self.ft.hi)
        r = torch.minimum(r, t)
        z = bcast(1 - t, x) * x + bcast(t, x) * e
        with torch.no_grad():
            v = velocity_of(continuous(self.teacher), self.ft, z, t, cond, uncond=uncond,
                            w=self.cfg.guidance_scale).to(z.dtype)
        student = continuous(self.student.denoiser)
        with jvp_attention():
            u, du_dt = torch.func.jvp(lambda z_, t_: velocity_of(student, self.ft, z_, t_, cond, r),
                                      (z, t), (v, torch.ones_like(t)))
        loss, sq = meanflow_loss(u, v, du_dt.detach(), t, r, self.cfg.weight_p, self.cfg.weight_c)
        return loss, {"loss/student/meanflow": loss.detach(), "meanflow/mse": sq.detach().mean() / x[0].numel(),
                      "meanflow/r_neq_t": (r < t).float().mean(), "meanflow/t_minus_r": (t - r).mean()}

    def forward(self, turn: str, batch: Batch, step: int):
        if turn != "student":
            raise ValueError(f"MeanFlow has one turn, 'student', not {turn!r}")
        x = batch.x0_real.float()
        cond = batch.cond_real if batch.cond_real is not None else batch.cond
        t, r = draw_times(batch.rand(0, x.device), batch.rand(1, x.device), batch.rand(2, x.device), self.cfg)
        return self.loss_terms(x, batch.randn_like(x, 3), t, r, cond, batch.uncond)
