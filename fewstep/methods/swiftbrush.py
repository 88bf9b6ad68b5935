"""SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score Distillation (Nguyen & Tran,
CVPR 2024, arXiv 2312.05239), with the random-scale guidance of SNOOPI's PG-SB (Proper Guidance - SwiftBrush,
Nguyen et al., arXiv 2412.02687, section 4).

Implements SwiftBrush's Algorithm 1 (image-free: prompts or class labels only, no real images, no GAN):
- the one-step student G fed pure noise z at the last timestep T of the teacher (t-list ``(999,)`` on VP
  teachers, ``(1000,)`` on flow teachers): ``x0 = G(z, T, y)``;
- the generator update (line 10, variational score distillation): at ``x_t = alpha_t x0 + sigma_t eps`` with
  ``t ~ U[t_min, t_max]``, ``g = sigma_t^2 (CFG(eps_T, kappa) - CFG(eps_F, kappa))`` with the SAME scale
  kappa on the frozen teacher T and on the critic F (the "LoRA teacher"), ``CFG(e, k) = e_u + k (e_c - e_u)``,
  and NO per-sample normaliser (unlike DMD); loss ``0.5 mean((x0 - sg(x0 - g))^2)``, so ``dL/dx0 = g / numel``.
  fewstep's denoisers return x0, and at one ``(x_t, t)`` ``eps = (x_t - alpha_t x0) / sigma_t`` is affine in
  x0 (CFG commutes with it: its weights sum to 1), so ``eps_T - eps_F = -(alpha_t / sigma_t)(x0_T - x0_F)`` and
  ``g = sigma_t^2 (eps_T - eps_F) = alpha_t sigma_t (x0_F - x0_T)``: the same vector, read off the x0
  predictions, applied to the x0 the student outputs (the official code applies g to its x0 too);
- the critic update (lines 11-13): ``t' ~ U[critic_t_min, critic_t_max)`` on the detached student output, epsilon
  MSE with prediction and target both multiplied by ``alpha_t'`` (the official code's ``sqrt(alphas_cumprod)``),
  i.e. ``mean(alpha_t'^2 (eps_F(x_t', y') - eps)^2)``: weight ``alpha_t'^2 = alphas_cumprod[t']`` on the squared
  error. The condition is replaced by the uncond embedding with probability ``cond_dropout`` (10%), drawn per
  sample from the batch seeds (the official code drops a whole batch 10% of the time: same rate, split-invariant
  here). Turns: one student update, then one critic update, every step (the official order);
- PG-SB: kappa ~ U[guidance_min, guidance_max] once per step, step-determined (every rank and a resume draw
  the same), applied to both teacher and critic in the generator update (their Table 2: both is best);
  ``guidance_min == guidance_max`` is plain SwiftBrush at that scale.

The critic is ``parts.critic()``: in ``lora`` mode an adapter on the one frozen base (the teacher is that base
with adapters off, as in SwiftBrush, where the LoRA teacher and teacher are one UNet); in ``full`` mode a
trainable copy. fewstep's ``lora`` mode also makes the student an adapter, and its adapters have alpha = rank
on the attention projections (SwiftBrush: rank 64, alpha 108 on to_q / to_v; PG-SB: rank 64, scaling 128).

Config fields -> paper symbols: ``guidance_min`` / ``guidance_max`` = PG-SB's kappa_min / kappa_max, equal for
SwiftBrush's fixed w (4.5 on SD2.1); ``t_min`` / ``t_max`` = the range of t in the generator loss (Algorithm 1:
0.02T..0.98T; the official code draws timesteps 20..980 of 1000); ``critic_t_min`` / ``critic_t_max`` = the range
of the critic's t' (0..T; the code draws 0..999); ``cond_dropout`` = the critic's condition-dropout rate (0.1);
``student_every``: the student turn runs every this many steps, the critic every step (1, the default, is
Algorithm 1's alternation, student first; above 1 it is DMD2's two time-scale update rule, not part of
SwiftBrush, with the critic's turn first in each step).

Not implemented: SNOOPI's NASA (an inference-time cross-attention processor for negative prompts) and SwiftBrush
v2's clamped CLIP loss (with its SD-Turbo initialisation and LoRA / full weight merging), which SNOOPI's recipe
also uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.core import losses, timesteps
from fewstep.core.conditioning import Batch, Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.guidance import cfg
from fewstep.core.schedules import bcast
from fewstep.methods.base import Method, Parts, Turn, require


@dataclass
class SwiftBrushConfig:
    """SwiftBrush / PG-SB hyperparameters (see the module docstring for the paper symbols)."""

    guidance_min: float = 4.5
    guidance_max: float = 4.5
    t_min: float = 0.02
    t_max: float = 0.981
    critic_t_min: float = 0.0
    critic_t_max: float = 1.0
    cond_dropout: float = 0.1
    student_every: int = 1


def vsd(x: Tensor, x0_real: Tensor, x0_fake: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, dict]:
    """SwiftBrush's generator loss ``0.5 mean((x - sg(x - g))^2)`` with ``g = alpha_t sigma_t (x0_fake - x0_real)``,
    which is ``sigma_t^2 (eps_real - eps_fake)`` in epsilon space (module docstring): ``dL/dx = g / x.numel()``.
    ``alpha``, ``sigma``: per-sample ``[B]``. The difference is taken in float64, as DMD2's."""
    with torch.no_grad():
        w = bcast(alpha.double() * sigma.double(), x0_real)
        g = w * (x0_fake.detach().double() - x0_real.detach().double())
        target = (x.detach().double() - g).float()
    loss = 0.5 * F.mse_loss(x.float(), target)
    logs = {"vsd/abs_real_minus_fake": (x0_real - x0_fake).abs().mean().float(),
            "grad_norm/student/vsd_term": (g.norm() / x.numel()).float()}
    return loss, logs


def drop_condition(cond: Cond, uncond: Cond, drop: Tensor) -> Cond:
    """Per sample, ``uncond`` where ``drop`` is True and ``cond`` elsewhere (classifier-free-guidance dropout)."""
    idx = torch.arange(len(drop), device=drop.device) + len(drop) * drop.long()
    return Cond.cat(cond, uncond)[idx]


class SwiftBrush(Method):
    """Student and critic turns of SwiftBrush / PG-SB over any ``Denoiser``."""

    name = "swiftbrush"
    Config = SwiftBrushConfig

    def __init__(self, cfg: SwiftBrushConfig, teacher: Denoiser, student: FewStepGenerator, critic: Denoiser):
        super().__init__()
        self.cfg = cfg
        self.teacher = teacher.requires_grad_(False)
        self.student, self.critic = student, critic
        # student_every = 1 keeps Algorithm 1's order (student, then critic). Above 1 the critic leads, as DMD2's
        # TTUR (not in SwiftBrush), and takes its turn first: the critic starts as the teacher, so a student turn
        # before any critic update has a zero VSD gradient (at kappa = 1) and would waste an update
        student, critic = Turn("student", every=cfg.student_every), Turn("critic")
        self.turns = (student, critic) if cfg.student_every == 1 else (critic, student)

    @classmethod
    def build(cls, cfg: SwiftBrushConfig, parts: Parts) -> SwiftBrush:
        """The student's input is pure noise at the teacher's last timestep: any other t-list is refused here,
        where the teacher (VP: 999, flow: 1000) is known."""
        schedule = parts.teacher.schedule
        last = schedule.N - 1 if schedule.kind == "vp" else schedule.N
        require(tuple(parts.timesteps) == (last,),
                f"model.student_timesteps {list(parts.timesteps)}: SwiftBrush's one-step student is fed pure noise "
                f"at the teacher's last timestep; set model.student_timesteps {last}")
        return cls(cfg, parts.teacher, parts.student(), parts.critic())

    @classmethod
    def validate(cls, cfg: SwiftBrushConfig, model, data) -> None:
        lo, hi = cfg.guidance_min, cfg.guidance_max
        require(0 <= lo <= hi, f"method.guidance_min {lo} / method.guidance_max {hi}: need 0 <= guidance_min <= "
                "guidance_max (equal values: plain SwiftBrush at that scale)")
        for a, b in (("t_min", "t_max"), ("critic_t_min", "critic_t_max")):
            u, v = getattr(cfg, a), getattr(cfg, b)
            require(0 <= u <= v <= 1, f"method.{a} {u} / method.{b} {v}: need 0 <= {a} <= {b} <= 1")
        require(0 <= cfg.cond_dropout <= 1, f"method.cond_dropout {cfg.cond_dropout} must be in [0, 1]")
        require(cfg.student_every >= 1, f"method.student_every {cfg.student_every} must be >= 1 (critic updates per "
                "student update; 1 = SwiftBrush's alternation)")
        require(len(model.student_timesteps) == 1, f"model.student_timesteps {list(model.student_timesteps)}: "
                "SwiftBrush trains a one-step student; give one timestep, the teacher's last (999; 1000 for flow)")
        require(not model.gan_head, "model.gan_head true: SwiftBrush is image-free and has no discriminator; set "
                "model.gan_head false")

    def trainable(self):
        return {"student": self.student.denoiser.trainable_parameters(),
                "critic": self.critic.trainable_parameters()}

    def checkpoint_modules(self):
        return {"student": self.student, "critic": self.critic}

    @staticmethod
    def draw_unit(step: int, salt: int) -> float:
        """A step-determined float in [0, 1): the same on every rank and after a resume (``Method.draw``'s seed)."""
        g = torch.Generator().manual_seed(1_000_003 * step + salt)
        return float(torch.rand((), generator=g, dtype=torch.float64))

    def guidance(self, step: int) -> float:
        """PG-SB's kappa for this step, uniform on [guidance_min, guidance_max]; SwiftBrush's w when they are equal."""
        lo, hi = self.cfg.guidance_min, self.cfg.guidance_max
        return lo if lo == hi else lo + (hi - lo) * self.draw_unit(step, 41)

    def forward(self, turn: str, batch: Batch, step: int):
        if turn == "student":
            return self.student_loss(batch, step)
        if turn == "critic":
            return self.critic_loss(batch, step)
        raise ValueError(f"SwiftBrush has turns 'student' and 'critic', not {turn!r}")

    def student_loss(self, batch: Batch, step: int):
        """The VSD update (Algorithm 1, line 10); teacher and critic run without gradient: the loss reaches the
        student through its output x0 alone."""
        c, schedule = self.cfg, self.teacher.schedule
        kappa = self.guidance(step)
        x = self.student(batch.noise, batch.cond)[0]
        x_t, t = timesteps.noised(schedule, x.detach(), batch, 1, c.t_min, c.t_max)
        f64 = torch.float64
        with torch.no_grad():
            x0_real = cfg(self.teacher, x_t, t, batch.cond, batch.uncond, kappa, dtype=f64)
            x0_fake = cfg(self.critic, x_t, t, batch.cond, batch.uncond, kappa, dtype=f64)
        loss, logs = vsd(x, x0_real, x0_fake, schedule.alpha(t), schedule.sigma(t))
        return loss, {"loss/student/vsd": loss.detach(), "guidance/kappa": torch.tensor(kappa), **logs}

    def dropped(self, batch: Batch, device=None) -> Tensor:
        """Which samples the critic sees unconditioned this turn: a per-sample draw below ``cond_dropout``."""
        return batch.rand(5, device) < self.cfg.cond_dropout

    def critic_loss(self, batch: Batch, step: int):
        """The LoRA-teacher update (Algorithm 1, lines 11-13): ``mean(alpha_t^2 (eps_F - eps)^2)``."""
        c, schedule = self.cfg, self.teacher.schedule
        with torch.no_grad():
            x0 = self.student(batch.noise, batch.cond)[0]
        t = timesteps.sample("uniform", batch.rand(3, x0.device), schedule, c.critic_t_min, c.critic_t_max)
        # a flow critic's epsilon at sigma_t = 0 is 0/0 through the x0 pivot: step off that measure-zero endpoint
        t = torch.where(schedule.sigma(t) > 0, t, torch.full_like(t, 1e-4))
        eps = batch.randn_like(x0, 4)
        x_t = schedule.add_noise(x0, eps, t)
        drop = self.dropped(batch, x0.device)
        pred = self.critic(x_t, t, drop_condition(batch.cond, batch.uncond, drop), "epsilon")
        loss = losses.dsm(pred, eps, bcast(schedule.alpha(t), x0) ** 2)
        return loss, {"loss/critic/eps": loss.detach(), "critic/dropped_fraction": drop.float().mean()}
