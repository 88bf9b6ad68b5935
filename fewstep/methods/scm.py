"""sCM: continuous-time consistency distillation (sCD) in TrigFlow (Lu & Song, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", ICLR 2025, arXiv 2410.11081).

TrigFlow (paper section 2): ``x_t = cos(t) x0 + sin(t) z``, ``z ~ N(0, sigma_d^2 I)``, ``t in [0, pi/2]``; the
diffusion model ``D(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, c_noise(t))``, the PF-ODE
``dx_t/dt = sigma_d F(x_t / sigma_d, t)``; the consistency model has the same form,
``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, c_noise(t))``.

A teacher on another process, exactly. With ``x_t = cos t x0 + sigma_d sin t eps`` and a VP or flow state
``x_s = alpha_s x0 + sigma_s eps`` (same x0, same eps), ``x_s / alpha_s = x0 + (sigma_s / alpha_s) eps`` and
``x_t / cos t = x0 + sigma_d tan(t) eps``: the two are one state, rescaled, when

    tan(t) = sigma_s / (sigma_d alpha_s),        x_s = k(t) x_t,   k = alpha_s / cos t = sigma_s / (sigma_d sin t),

i.e. ``t = arctan(sigma_s / alpha_s)`` at sigma_d = 1 (VP) and ``arctan(s / (1 - s))`` (rectified flow). From
``alpha^2 + sigma^2 = 1`` (VP) ``k = 1 / sqrt(cos^2 t + sigma_d^2 sin^2 t)``; from ``alpha + sigma = 1`` (flow)
``k = 1 / (cos t + sigma_d sin t)``. The flow time of MeanFlow's path, ``tau = sigma / (alpha + sigma)``, is
``sigma_d sin t / (cos t + sigma_d sin t)``, so ``TrigTime`` goes through ``fewstep.core.flow_time.FlowTime`` for the process time
s (its inversion of a VP teacher's interpolated ``log alpha_bar``). The student is the teacher's backbone at
``(k x_t, s(t))``, its x0 estimate ``x0_theta``; the TrigFlow output is
``F = (cos t x_t - x0_theta) / (sigma_d sin t)``, hence ``f_theta = x0_theta``: the consistency function is the
student's own x0, and the student samples as every "x0, then fresh noise" student does (the paper's multistep
sampler re-noises with fresh z), exported by the same stock LCMScheduler / FlowMatchLCMScheduler /
FewStepScheduler path as DMD2 (no boundary scalings: ``f`` is x0 by construction). The backbone sees the
teacher's own timestep of s, not the paper's ``c_noise(t)``.

The loss (Algorithm 1, sCD; theta^- = sg(theta), no EMA target, as the paper's sCD):

    dx_t/dt = sigma_d F_pre,w                                 (teacher, CFG uncond + w (cond - uncond))
    g = -cos^2(t) (sigma_d F_theta- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF_theta-/dt)
    g <- g / (||g|| + c)                                      (tangent normalisation, per sample)
    L = e^{w_phi(t)} / D ||F_theta - F_theta- - g||^2 - w_phi(t)      (adaptive weighting; D = dim of x0)

``g = cos(t) df/dt`` with ``df/dt = -cos t (sigma_d F - dx_t/dt) - sin t (x_t + sigma_d dF/dt)``; the warm-up
factor r ramps linearly 0 -> 1 over the first H steps. ``dF_theta-/dt`` is the total derivative along
``(dx_t/dt, 1)``, one forward-mode pass (``fewstep.core.jvp``: math-backend attention, unrounded timesteps); its
primal output is ``F_theta`` with its graph. Times: ``t = arctan(e^tau / sigma_d)``, ``tau ~ N(P_mean, P_std^2)``
(log-normal proposal over ``sigma_d tan t``, EDM's sigma), clamped into the teacher's covered range.

Sources. The stored copies of the paper served only its first page and abstract, so the formulas above (Algorithm
1, the tangent of eq. 6-8, warm-up, normalisation c = 0.1, adaptive weighting, the proposal with CIFAR-10
``P_mean = -1.0, P_std = 1.4``, ImageNet ``-0.8, 1.6``, sigma_d = 0.5, warm-up H = 10k iterations) are from memory
of the paper, and agree with the notes in ``../shared/reference/sid_fdistill_consistency.md`` section 2.12 (NVlabs/rcm:
normalisation c = 0.1, warm-up ratio r) and a public re-implementation's defaults seen in search (sigma_d 0.5,
P_mean -1.0, P_std 1.4 "from Appendix G.2"). The VP / flow -> TrigFlow map is derived above and tested.
``w_phi`` here is a linear layer on fixed Fourier features of t (the paper uses a one-layer MLP on the network's
time embedding), zero-initialised so that training starts at weight 1.

Config fields -> paper symbols: ``guidance_scale`` = teacher CFG w (1 = none); ``sigma_d`` = sigma_d;
``p_mean`` / ``p_std`` = P_mean / P_std; ``tangent_c`` = c; ``tangent_warmup`` = H (steps; 0 = r = 1 at once);
``weight_features`` = the number of Fourier frequencies of w_phi. Full mode only; no GAN head; real data for x0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.core.conditioning import Batch, Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.flow_time import FlowTime
from fewstep.core.generator import FewStepGenerator
from fewstep.core.guidance import cfg as guided
from fewstep.core.jvp import continuous, jvp_attention
from fewstep.core.schedules import NoiseSchedule, bcast
from fewstep.errors import ConfigError
from fewstep.methods.base import Method, Parts, Turn, has_real_images, require

T_MIN = 1e-3        # smallest angle trained: F divides by sin t
SALT = 40           # the batch-seed salts of t and eps


@dataclass
class SCMConfig:
    """sCD hyperparameters (see the module docstring for the paper symbols)."""

    guidance_scale: float = 1.25
    sigma_d: float = 0.5
    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_c: float = 0.1
    tangent_warmup: int = 10_000
    weight_features: int = 8


class TrigTime:
    """A VP or flow teacher's process seen in TrigFlow (module docstring): angle t <-> process time s, the state scale
    ``k(t) = x_s / x_t``, and the TrigFlow output ``F`` of an x0 estimate."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str, sigma_d: float):
        if schedule.kind not in ("vp", "flow") or (schedule.kind == "vp" and prediction_type == "flow_prediction"):
            raise ConfigError(f"sCM needs a VP (epsilon / v / sample) or rectified-flow teacher; this one is "
                              f"{schedule.kind} with {prediction_type}")
        self.ft, self.kind, self.sigma_d = FlowTime(schedule, prediction_type), schedule.kind, float(sigma_d)
        self.lo, self.hi = (float(v) for v in self.of(torch.tensor([0.0, 1.0])))

    def of(self, s: Tensor) -> Tensor:
        """The angle ``arctan(sigma_s / (sigma_d alpha_s))`` of process time s (float64)."""
        sch = self.ft.schedule
        return torch.atan2(sch.sigma(s, torch.float64), self.sigma_d * sch.alpha(s, torch.float64))

    def flow_time(self, t: Tensor) -> Tensor:
        """``tau = sigma_d sin t / (cos t + sigma_d sin t)`` (float64): MeanFlow's path time of the same SNR."""
        t = t.double()
        return self.sigma_d * t.sin() / (t.cos() + self.sigma_d * t.sin())

    def process_time(self, t: Tensor) -> Tensor:
        """The teacher's time s of angle t (float32, differentiable in t)."""
        return self.ft.process_time(self.flow_time(t))

    def scale(self, t: Tensor) -> Tensor:
        """``k(t)``: ``x_s = k x_t`` (float64)."""
        t, sd = t.double(), self.sigma_d
        if self.kind == "flow":
            return 1 / (t.cos() + sd * t.sin())
        return (t.cos() ** 2 + (sd * t.sin()) ** 2).rsqrt()

    def output(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``F = (cos t x_t - x0) / (sigma_d sin t)`` (float64)."""
        t = bcast(t.double(), x_t.double())
        return (t.cos() * x_t.double() - x0.double()) / (self.sigma_d * t.sin())


def trig_output(d: Denoiser, tt: TrigTime, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond | None = None,
                w: float = 1.0) -> Tensor:
    """``F(x_t / sigma_d, t)`` of denoiser d (``uncond``: guided ``F_u + w (F_c - F_u)``), float64."""
    x_s, s = bcast(tt.scale(t), x_t.double()) * x_t.double(), tt.process_time(t)
    x0 = d(x_s, s, cond, "sample", torch.float64) if uncond is None else guided(
        d, x_s, s, cond, uncond, w, "sample", torch.float64)
    return tt.output(x0, x_t, t)


def draw_times(u: Tensor, cfg: SCMConfig) -> Tensor:
    """``t = arctan(e^tau / sigma_d)``, ``tau ~ N(P_mean, P_std^2)``, from U(0, 1) draws (the paper's proposal)."""
    tau = cfg.p_mean + cfg.p_std * math.sqrt(2) * torch.erfinv((2 * u - 1).clamp(-1 + 1e-7, 1 - 1e-7))
    return torch.atan(tau.exp() / cfg.sigma_d)


def warmup_ratio(step: int, H: int) -> float:
    """r = min(1, step / H): the tangent warm-up factor (H = 0: no warm-up)."""
    return 1.0 if H <= 0 else min(1.0, step / H)


def scm_loss(F: Tensor, F_minus: Tensor, dF_dt: Tensor, v: Tensor, x_t: Tensor, t: Tensor, w: Tensor, r: float,
             sigma_d: float, c: float) -> tuple[Tensor, Tensor]:
    """``(loss, g)``: Algorithm 1's normalised tangent g and ``mean_b e^w / D ||F - F^- - g||^2 - w`` (the tangent
    and the residual in float64: at theta^- = theta the residual is g alone, small beside F; the loss in float32).
    ``v`` = dx_t/dt; ``F_minus``, ``dF_dt``, ``v`` are constants."""
    x, tb = x_t.double(), bcast(t.double(), x_t.double())
    g = -tb.cos() ** 2 * (sigma_d * F_minus.double() - v.double()) - r * tb.cos() * tb.sin() * (
        x + sigma_d * dF_dt.double())
    g = g / (g.flatten(1).norm(dim=1) + c).reshape(bcast(t, x).shape)
    sq = (F.double() - (F_minus.double() + g).detach()).pow(2).flatten(1).mean(1)
    return (w.exp() * sq.float() - w).mean(), g


class AdaptiveWeight(nn.Module):
    """``w_phi(t)``: a linear layer on ``[cos, sin](2^i t)``, i < n, zero-initialised (weight e^0 = 1 at the start)."""

    def __init__(self, n: int = 8):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(n, dtype=torch.float32), persistent=False)
        self.linear = nn.Linear(2 * n, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.float()[:, None] * self.freqs[None]
        return self.linear(torch.cat([arg.cos(), arg.sin()], 1))[:, 0]


def check_scm_config(cfg: SCMConfig, model, data, name: str = "sCM") -> None:
    """The checks sCM and rCM share (``name`` says whose in the messages)."""
    require(cfg.guidance_scale >= 0, f"method.guidance_scale {cfg.guidance_scale} must be >= 0 (uncond + w (cond - "
            "uncond); 1 = no guidance)")
    require(cfg.sigma_d > 0, f"method.sigma_d {cfg.sigma_d} must be > 0 (TrigFlow's data standard deviation)")
    require(cfg.p_std > 0, f"method.p_std {cfg.p_std} must be > 0 (the proposal's log-normal P_std)")
    require(cfg.tangent_c > 0, f"method.tangent_c {cfg.tangent_c} must be > 0 (g / (||g|| + c))")
    require(cfg.tangent_warmup >= 0, f"method.tangent_warmup {cfg.tangent_warmup} must be >= 0 steps (0 = none)")
    require(cfg.weight_features >= 1, f"method.weight_features {cfg.weight_features} must be at least 1")
    require(model.mode == "full", f"model.mode lora: {name} differentiates the student forward-mode, tested on full "
            "copies only; set model.mode full")
    require(has_real_images(data), f"{name} builds x_t from real samples and data.source {data.source!r} has none; "
            "set data.images to a folder of real images (captions in <name>.txt), data.source images")


class SCMObjective(nn.Module):
    """The sCD loss of a student against a teacher, with its adaptive weight ``w_phi`` (shared by sCM and rCM)."""

    def __init__(self, cfg: SCMConfig, teacher: Denoiser, student: FewStepGenerator):
        super().__init__()
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.tt = TrigTime(teacher.schedule, teacher.prediction_type, cfg.sigma_d)
        self.weight = AdaptiveWeight(cfg.weight_features)

    def loss_terms(self, x0: Tensor, eps: Tensor, t: Tensor, cond: Cond, uncond: Cond, r: float):
        """Algorithm 1 at given data, unit noise, angles and warm-up factor: ``(loss, logs)``."""
        c, tt = self.cfg, self.tt
        t = t.clamp(max(tt.lo, T_MIN), tt.hi)
        x_t = (bcast(t.cos(), x0) * x0 + bcast(c.sigma_d * t.sin(), x0) * eps).to(x0.dtype)
        with torch.no_grad():
            v = (c.sigma_d * trig_output(continuous(self.teacher), tt, x_t, t, cond, uncond, c.guidance_scale))
        student = continuous(self.student.denoiser)
        with jvp_attention():
            F, dF_dt = torch.func.jvp(lambda x_, t_: trig_output(student, tt, x_, t_, cond), (x_t, t),
                                      (v.to(x_t.dtype), torch.ones_like(t)))
        w = self.weight(t)
        loss, g = scm_loss(F, F.detach(), dF_dt.detach(), v, x_t, t, w, r, c.sigma_d, c.tangent_c)
        return loss, {"loss/student/scm": loss.detach(), "scm/w_phi": w.detach().mean(), "scm/t": t.mean(),
                      "scm/tangent_norm": g.flatten(1).norm(dim=1).mean().float(), "scm/warmup_r": torch.tensor(r)}

    def forward(self, batch: Batch, step: int):
        x0 = batch.x0_real.float()
        cond = batch.cond_real if batch.cond_real is not None else batch.cond
        # salts of their own: rCM draws DMD2's times and noise from the same batch seeds
        t = draw_times(batch.rand(SALT, x0.device), self.cfg)
        return self.loss_terms(x0, batch.randn_like(x0, SALT + 1), t, cond, batch.uncond,
                               warmup_ratio(step, self.cfg.tangent_warmup))


class SCM(Method):
    """sCD with one ``Turn("student")``: the student and ``w_phi`` train together."""

    name = "scm"
    Config = SCMConfig
    turns = (Turn("student"),)

    @classmethod
    def build(cls, cfg: SCMConfig, parts: Parts) -> SCM:
        return cls(cfg, parts.teacher, parts.student())

    @classmethod
    def validate(cls, cfg: SCMConfig, model, data) -> None:
        check_scm_config(cfg, model, data)
        require(not model.gan_head, "model.gan_head true: sCM has no discriminator; set model.gan_head false")

    def __init__(self, cfg: SCMConfig, teacher: Denoiser, student: FewStepGenerator):
        super().__init__()
        self.cfg, self.teacher, self.student = cfg, teacher.requires_grad_(False), student
        self.scm = SCMObjective(cfg, self.teacher, student)

    def trainable(self):
        return {"student": self.student.denoiser.trainable_parameters() + list(self.scm.weight.parameters())}

    def checkpoint_modules(self):
        return {"student": self.student, "weight": self.scm.weight}

    def forward(self, turn: str, batch: Batch, step: int):
        if turn != "student":
            raise ValueError(f"sCM has one turn, 'student', not {turn!r}")
        return self.scm(batch, step)
