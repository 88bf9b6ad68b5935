"""Phased DMD: few-step distribution matching distillation with score matching within subintervals
(arXiv 2510.27684), as a delta over DMD2 (arXiv 2405.14867, ``dmd2.py``).

The student's t-list ``t_0 > t_1 > ... > t_{K-1}`` (``t_K = 0``) is cut into P phases, contiguous groups of
steps; phase p covers the SNR subinterval ``[s_p, e_p]`` with ``e_p`` its first time and ``s_p`` the first
time of phase p + 1 (0 for the last). Each phase has its own expert (a full copy of the backbone; the Wan 2.2
high/low-noise experts are P = 2). Implemented:

- progressive distribution matching: phases are trained one after the other from the noisiest down, each
  for ``total_steps / P`` steps (``phase_order="progressive"``; ``"alternate"`` cycles them per student
  update, as LightX2V's trainer does). Earlier experts only run, without gradient, to produce the phase
  input ``x_{e_p}`` (backward simulation, DMD2 section 4.5);
- the phase generator: the expert maps ``x_{t_k}`` to x0, which is re-noised with fresh noise to the phase
  end, ``x_s = alpha_s x0 + sigma_s eps`` (``x_s = x0`` in the last phase);
- the DM loss within the subinterval: ``x_t = transition(x_s, s, t, eps)``, ``alpha = alpha_t / alpha_s``,
  ``beta^2 = sigma_t^2 - alpha^2 sigma_s^2``, ``t ~ U[s + margin, e]``; the real score is the CFG teacher
  (the teacher's marginal at t is the diffused marginal at s, so no correction is needed), the gradient
  is DMD's ``(x0_fake - x0_real) / mean|x0 - x0_real|`` (``losses.dmd``) applied to the expert's x0. x_s is
  affine in x0 with a positive factor, so this is the direction of the gradient with respect to x_s; the
  dropped factor ``alpha alpha_s`` is one more time weighting on top of DMD's normalizer;
- score matching within subintervals (the paper's derivation, LightX2V's ``phased_velocity_target``): the
  fake score of the diffused expert outputs is ``E[grad log q(x_t | x_s) | x_t]``
  ``= -E[(x_t - alpha x_s) / beta^2 | x_t]``, so the critic regresses ``eps_target = (sigma_t / beta) eps`` (x0 target
  ``(x_t - sigma_t eps_target) / alpha_t``, converted to the critic's output type). For s = 0 it is the usual
  denoising target. The variance ``sigma_t / beta`` grows as t -> s, hence the margin. One critic serves every
  phase: their time ranges are disjoint.

Config fields -> paper symbols: everything of ``DMD2Config`` (``guidance_scale`` = teacher CFG scale,
``student_every`` = TTUR ratio, ``t_min``/``t_max`` and ``critic_t_min``/``critic_t_max`` clamp the
subinterval draws); ``phases`` = number of phases/experts P (0: one per student step); ``margin`` = the
distance kept from the lower edge s (LightX2V: 20 of 1000 timesteps); ``phase_order`` as above.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fewstep.core import timesteps
from fewstep.core.conditioning import Batch
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.parameterization import from_x0
from fewstep.core.schedules import bcast
from fewstep.errors import ConfigError
from fewstep.methods.base import Parts, require
from fewstep.methods.dmd2 import DMD2, DMD2Config

MAX_EXPERTS = 4   # FewStepClassPipeline's unet, unet_1, unet_2, unet_3
PHASE_ORDERS = ("progressive", "alternate")


@dataclass
class PhasedDMDConfig(DMD2Config):
    """DMD2 hyperparameters plus the phase split (see the module docstring)."""

    phases: int = 0
    margin: float = 0.02
    phase_order: str = "progressive"


def phase_split(K: int, phases: int) -> list[int]:
    """Phase index of each of the K student steps: P contiguous, (nearly) equal groups."""
    P = phases or K
    if not 1 <= P <= min(K, MAX_EXPERTS):
        raise ConfigError(f"method.phases {phases}: need 1..{min(K, MAX_EXPERTS)} phases for a {K}-step student "
                          f"(at most one per step and {MAX_EXPERTS} experts per exported pipeline); 0 = one per step")
    return [i * P // K for i in range(K)]


def phased_generator(students: list[FewStepGenerator], phases: int = 0) -> FewStepGenerator:
    """One student whose step i runs the expert of its phase, from independently built students (each a
    full copy of the teacher): their denoisers become the experts."""
    first = students[0]
    split = phase_split(first.K, phases)
    if len(students) != split[-1] + 1:
        raise ValueError(f"{len(students)} students given for {split[-1] + 1} phases")
    return FewStepGenerator([s.denoiser for s in students], first.t_list, first.init_scale, phase_of_step=split)


class PhasedDMD(DMD2):
    """DMD2's two turns, restricted to one phase (expert and subinterval) at a time."""

    name = "phased_dmd"
    Config = PhasedDMDConfig

    def __init__(self, cfg: PhasedDMDConfig, teacher: Denoiser, student: FewStepGenerator, critic: Denoiser,
                 total_steps: int, head: nn.Module | None = None):
        super().__init__(cfg, teacher, student, critic, head)
        require(cfg.phase_order in PHASE_ORDERS,
                f"method.phase_order {cfg.phase_order!r} is not valid; use {' or '.join(PHASE_ORDERS)}")
        self.total_steps = max(int(total_steps), 1)

    @classmethod
    def build(cls, cfg: PhasedDMDConfig, parts: Parts) -> "PhasedDMD":
        """One full student copy per phase (an expert), one critic shared by every phase."""
        P = phase_split(len(parts.timesteps), cfg.phases)[-1] + 1
        student = phased_generator([parts.student() for _ in range(P)], cfg.phases)
        critic = parts.critic()
        return cls(cfg, parts.teacher, student, critic, parts.total_steps, parts.head(critic))

    @classmethod
    def validate(cls, cfg: PhasedDMDConfig, model, data) -> None:
        super().validate(cfg, model, data)
        require(model.mode == "full", "model.mode lora: phased DMD trains one full copy per phase; per-phase LoRA "
                "experts are not implemented: set model.mode full")
        require(cfg.phase_order in PHASE_ORDERS,
                f"method.phase_order {cfg.phase_order!r} is not valid; use {' or '.join(PHASE_ORDERS)}")
        require(0 <= cfg.margin < 1, f"method.margin {cfg.margin} must be in [0, 1)")
        phase_split(len(model.student_timesteps), cfg.phases)

    def trainable(self):
        params = super().trainable()
        params["student"] = [p for d in self.student.experts for p in d.trainable_parameters()]
        return params

    def phase(self, step: int) -> int:
        """The phase trained at ``step``: equal step budgets from the noisiest phase down, or cycling."""
        P = self.student.P
        if self.cfg.phase_order == "alternate":
            return (step // self.cfg.student_every) % P
        return min(step * P // self.total_steps, P - 1)

    def sim_step(self, step: int) -> int:
        """The student step trained: one of the phase's steps (step-determined, equal on every rank)."""
        steps = self.student.steps_of(self.phase(step))
        return steps[self.draw(step, 17, len(steps))] if self.cfg.backward_simulation else steps[0]

    def generate(self, batch: Batch, step: int):
        """Expert output x0 and its re-noising to the phase's lower edge: ``(x0, x_s, s, e)``."""
        s, e = self.student.interval(self.phase(step))
        x0, _, _ = self.student(batch.noise, batch.cond, self.sim_step(step),
                                eps_fn=lambda i: batch.randn_like(batch.noise, 100 + i))
        x_s = self.student.add_noise(x0, torch.full((len(x0),), s), batch.randn_like(x0, 200)) if s > 0 else x0
        return x0, x_s, s, e

    def subinterval(self, x_s, s: float, e: float, batch: Batch, salt: int, lo: float, hi: float):
        """``x_t ~ q(x_t | x_s)`` with ``t ~ U[s + margin, e]`` (clamped to [lo, hi]) and the critic's noise
        target ``(sigma_t / beta) eps``. At s = 0, x_s is data and this is the usual forward process."""
        sch = self.teacher.schedule
        lo, hi = max(s + self.cfg.margin, lo), min(e, hi)
        t = timesteps.sample("uniform", batch.rand(salt, x_s.device), sch, lo, max(lo, hi))
        eps = batch.randn_like(x_s, salt + 1)
        if s == 0:
            return sch.add_noise(x_s, eps, t), t, eps
        s_ = torch.full_like(t, s)
        a = sch.alpha(t) / sch.alpha(s_)
        beta = (sch.sigma(t) ** 2 - a ** 2 * sch.sigma(s_) ** 2).clamp_min(1e-12).sqrt()
        return sch.transition(x_s, s_, t, eps), t, bcast(sch.sigma(t) / beta, eps) * eps

    def student_loss(self, batch: Batch, step: int):
        """DM loss of the phase's expert on its subinterval (+ the optional GAN term of DMD2)."""
        c = self.cfg
        x0, x_s, s, e = self.generate(batch, step)
        x_t, t, _ = self.subinterval(x_s, s, e, batch, 1, c.t_min, c.t_max)
        loss, logs = self.distribution_matching(x0, x_t, t, batch)
        return loss, {"phase": torch.tensor(float(self.phase(step))), **logs}

    def critic_loss(self, batch: Batch, step: int):
        """Score matching within the subinterval on detached expert outputs (+ DMD2's GAN discriminator)."""
        c = self.cfg
        with torch.no_grad():
            _, x_s, s, e = self.generate(batch, step)
        x_t, t, eps_target = self.subinterval(x_s, s, e, batch, 3, c.critic_t_min, c.critic_t_max)
        sch, kind = self.critic.schedule, self.critic.prediction_type
        x0_target = (x_t - bcast(sch.sigma(t), x_t) * eps_target) / bcast(sch.alpha(t), x_t)
        target = from_x0(x0_target, x_t, t, kind, sch)
        # real data noised to the same times: the teacher's marginal there is what x_t should match
        return self.critic_objective(x_t, t, target, batch, lambda: (
            sch.add_noise(batch.x0_real, batch.randn_like(batch.x0_real, 5), t), t))
