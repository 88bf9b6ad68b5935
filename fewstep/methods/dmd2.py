"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, arXiv 2405.14867).

Implements
- the distribution matching gradient of DMD (arXiv 2311.18828, eq. 7) with the per-sample normalizer of
  eq. 8: ``g = (x0_fake - x0_real) / mean|x - x0_real|`` (``losses.dmd``), the real score taken with
  classifier-free guidance ``uncond + w (cond - uncond)``;
- the critic (fake score ``mu_fake``) trained by denoising on detached student samples over the full time
  range (DMD2 section 4.1);
- the two time-scale update rule (section 4.1): ``Turn("critic")`` every step, ``Turn("student",
  every=student_every)``;
- the optional diffusion-GAN term (section 4.2): a head on the critic's bottleneck (forward hook), noisy
  real and fake inputs, non-saturating softplus losses; the discriminator loss also trains the critic;
- multi-step students with backward simulation (section 4.5): train step k on the output of k no-grad
  student steps from fresh noise, k the same on every rank.

Config fields -> paper symbols: ``guidance_scale`` = real-score CFG scale; ``student_every`` = the TTUR
ratio (5 for ImageNet/SDXL, 10 for SD1.5); ``t_min``/``t_max`` = the DM-loss time range (0.02T, 0.98T);
``gan_weight_student`` / ``gan_weight_critic`` = lambda_GAN of the generator / discriminator
(``gen_cls_loss_weight`` / ``guidance_cls_loss_weight``). ``gan_features = "teacher"`` puts the head on the
frozen teacher's tapped features instead of the critic's (FastGen's discriminator): the GAN path sends no
gradient into the critic, the critic turn's two discriminator passes run forward-only and stop at the tapped
block, and the student turn reads the features off the teacher pass it makes anyway (its conditional half).
DMD's regression loss is not offered here: it needs teacher samples paired with their noise, which the method
`kd` caches (fewstep.methods.kd) and no data source of DMD2 provides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fewstep.core import losses, timesteps
from fewstep.core.conditioning import Batch
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.guidance import cfg
from fewstep.core.parameterization import from_x0
from fewstep.methods.base import Method, Parts, Turn, check_critic_config, require


@dataclass
class DMD2Config:
    """DMD2 hyperparameters (see the module docstring for the paper symbols)."""

    guidance_scale: float = 2.0
    student_every: int = 5
    t_min: float = 0.02
    t_max: float = 0.98
    critic_t_min: float = 0.0
    critic_t_max: float = 1.0
    gan_weight_student: float = 0.0
    gan_weight_critic: float = 1e-2
    backward_simulation: bool = True
    gan_features: str = "critic"


class DMD2(Method):
    """Student and critic turns of DMD2 over any ``Denoiser``."""

    name = "dmd2"
    Config = DMD2Config

    def __init__(self, cfg: DMD2Config, teacher: Denoiser, student: FewStepGenerator, critic: Denoiser,
                 head: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.teacher = teacher.requires_grad_(False)
        self.student, self.critic, self.head = student, critic, head
        self.turns = (Turn("critic"), Turn("student", every=cfg.student_every))
        require(cfg.gan_weight_student == 0 or head is not None,
                "method.gan_weight_student > 0 needs a discriminator head: set model.gan_head true")

    @classmethod
    def build(cls, cfg: DMD2Config, parts: Parts) -> "DMD2":
        critic = parts.critic()
        return cls(cfg, parts.teacher, parts.student(), critic, parts.head(critic))

    @classmethod
    def validate(cls, cfg: DMD2Config, model, data) -> None:
        require(cfg.student_every >= 1, f"method.student_every {cfg.student_every} must be at least 1 (the critic "
                "updates every step, the student every student_every-th)")
        require(cfg.guidance_scale >= 0, f"method.guidance_scale {cfg.guidance_scale} must be >= 0 "
                "(uncond + w (cond - uncond); 1 = no guidance)")
        check_critic_config(cfg, model, data)
        require(cfg.gan_features in ("critic", "teacher"), f"method.gan_features {cfg.gan_features!r} is not valid; "
                "use critic (the head on the fake score's features, DMD2) or teacher (on the frozen teacher's)")

    def trainable(self):
        critic = self.critic.trainable_parameters() + (list(self.head.parameters()) if self.head is not None else [])
        return {"student": self.student.denoiser.trainable_parameters(), "critic": critic}

    def checkpoint_modules(self):
        mods = {"student": self.student, "critic": self.critic}
        if self.head is not None:
            mods["head"] = self.head
        return mods

    @property
    def teacher_features(self) -> bool:
        """Whether the head reads the frozen teacher's features (``gan_features = "teacher"``)."""
        return self.head is not None and self.cfg.gan_features == "teacher"

    @property
    def use_gan(self) -> bool:
        return self.head is not None and self.cfg.gan_weight_student > 0

    def sim_step(self, step: int) -> int:
        """Backward-simulation index: a step-determined k in [0, K) (0 when the student has one step)."""
        K = self.student.K
        return self.draw(step, 17, K) if (K > 1 and self.cfg.backward_simulation) else 0

    def forward(self, turn: str, batch: Batch, step: int):
        if turn == "student":
            return self.student_loss(batch, step)
        if turn == "critic":
            return self.critic_loss(batch, step)
        raise ValueError(f"DMD2 has turns 'student' and 'critic', not {turn!r}")

    def generate(self, batch: Batch, step: int):
        """Student output at the backward-simulation step of this training step."""
        return self.student(batch.noise, batch.cond, self.sim_step(step),
                            eps_fn=lambda i: batch.randn_like(batch.noise, 100 + i))

    def logits(self, x_t, t, cond, out: str = "sample", dtype=torch.float32):
        """Critic output and the head's logits on its tapped bottleneck (one pass)."""
        with self.critic.backbone.tap() as feats:
            pred = self.critic(x_t, t, cond, out, dtype)
        return pred, self.head(feats[-1])

    def student_loss(self, batch: Batch, step: int):
        """DM loss (eq. 7-8) + lambda_GAN * softplus(-D(x_t))."""
        c = self.cfg
        x, _, k = self.generate(batch, step)
        x_t, t = timesteps.noised(self.teacher.schedule, x, batch, 1, c.t_min, c.t_max)
        loss, logs = self.distribution_matching(x, x_t, t, batch)
        return loss, {"student/sim_step": torch.tensor(float(k)), **logs}

    #: f-distill reads the discriminator's logit even without a GAN term (its density ratio)
    needs_logit = False

    def distribution_matching(self, x, x_t, t, batch: Batch):
        """The student objective at the noised sample ``x_t`` of its output ``x``: the DM term (``dm_loss``),
        and DMD2's GAN term. Shared by f-distill and Phased DMD, which change
        ``dm_loss`` and how ``x_t`` is drawn."""
        c = self.cfg
        # x_t keeps its graph to x: only the GAN term differentiates through it (the critic is frozen
        # this turn); the DM term's gradient is the closed form in losses.dmd.
        # both x0 estimates in float64 (as the official DMD2): their difference is the gradient
        f64 = torch.float64
        logit = None
        if self.teacher_features and (self.use_gan or self.needs_logit):
            # one teacher pass gives x0_real and the head's features; it differentiates (to x_t) only for the GAN
            grad = self.use_gan and torch.is_grad_enabled()
            with torch.set_grad_enabled(grad), self.teacher.backbone.tap() as feats:
                x0_real = cfg(self.teacher, x_t if self.use_gan else x_t.detach(), t, batch.cond, batch.uncond,
                              c.guidance_scale, dtype=f64)
            x0_real, logit = x0_real.detach(), self.head(feats[-1][: len(x_t)])
        else:
            with torch.no_grad():
                x0_real = cfg(self.teacher, x_t.detach(), t, batch.cond, batch.uncond, c.guidance_scale, dtype=f64)
        if self.teacher_features:
            with torch.no_grad():
                x0_fake = self.critic(x_t.detach(), t, batch.cond, dtype=f64)
        elif self.use_gan:
            x0_fake, logit = self.logits(x_t, t, batch.cond, dtype=f64)
            x0_fake = x0_fake.detach()
        elif self.needs_logit:
            with torch.no_grad():
                x0_fake, logit = self.logits(x_t.detach(), t, batch.cond, dtype=f64)
        else:
            with torch.no_grad():
                x0_fake = self.critic(x_t.detach(), t, batch.cond, dtype=f64)
        loss, logs = self.dm_loss(x, x0_real, x0_fake, logit, t)
        logs = {"loss/student/dmd": loss.detach(), **logs}
        if self.use_gan:
            g = losses.gan_g(logit)
            loss = loss + c.gan_weight_student * g
            logs["loss/student/gan"] = g.detach()
        return loss, logs

    def dm_loss(self, x, x0_real, x0_fake, logit, t):
        """DMD's distribution-matching loss (eq. 7-8), unweighted."""
        return losses.dmd(x, x0_real, x0_fake)

    def critic_loss(self, batch: Batch, step: int):
        """Denoising loss of the fake score on detached student samples (+ GAN discriminator loss)."""
        c = self.cfg
        with torch.no_grad():
            x = self.generate(batch, step)[0]
        x_t, t = timesteps.noised(self.teacher.schedule, x, batch, 3, c.critic_t_min, c.critic_t_max)
        target = from_x0(x, x_t, t, self.critic.prediction_type, self.critic.schedule)
        return self.critic_objective(x_t, t, target, batch, lambda: timesteps.noised(
            self.teacher.schedule, batch.x0_real, batch, 5, c.critic_t_min, c.critic_t_max))

    def critic_objective(self, x_t, t, target, batch: Batch, noised_real):
        """The critic's denoising loss at ``(x_t, t)`` towards ``target`` (its output space) and, with a head, the
        discriminator loss against real data noised by ``noised_real() -> (xr_t, tr)``. Phased DMD changes only
        the target and the noise levels."""
        kind = self.critic.prediction_type
        if self.head is None:
            loss = losses.dsm(self.critic(x_t, t, batch.cond, kind), target)
            return loss, {"loss/critic/dsm": loss.detach()}
        xr_t, tr = noised_real()
        if self.teacher_features:
            dsm = losses.dsm(self.critic(x_t, t, batch.cond, kind), target)
            with torch.no_grad():       # the frozen teacher's features: gradients reach the head only
                f_fake = self.teacher.features(x_t.detach(), t, batch.cond)[-1]
                f_real = self.teacher.features(xr_t, tr, batch.cond_real or batch.cond)[-1]
            logit_fake, logit_real = self.head(f_fake), self.head(f_real)
        else:
            pred, logit_fake = self.logits(x_t, t, batch.cond, kind)
            dsm = losses.dsm(pred, target)
            logit_real = self.head(self.critic.features(xr_t, tr, batch.cond_real or batch.cond)[-1])
        d = losses.gan_d(logit_real, logit_fake)
        logs = {"loss/critic/dsm": dsm.detach(), "loss/critic/gan": d.detach(),
                "gan/p_real": torch.sigmoid(logit_real).mean().detach(),
                "gan/p_fake": torch.sigmoid(logit_fake).mean().detach()}
        return dsm + self.cfg.gan_weight_critic * d, logs
