"""SiD: Score identity Distillation (Zhou et al., ICML 2024, arXiv 2404.04057), with Long-and-Short
Guidance (SiD-LSG, arXiv 2406.01561) and few-step generators (Few-step SiD, arXiv 2505.12674).

Implements
- the generator loss of SiD (its alpha-weighted loss with the per-sample normaliser, ``losses.sid``):
  ``sum (y_real - y_fake) ((y_real - x_g) - alpha (y_real - y_fake)) / w``, ``w = sg(mean|x_g - y_real|)``,
  with ``y_real = f_phi(x_t)``, ``y_fake = f_psi(x_t)`` the teacher's and critic's x0 predictions at
  ``x_t = alpha_t x_g + sigma_t eps``; gradients flow through ``x_t`` into both frozen networks;
- the fake-score (critic) step: denoising loss on detached generator samples; each training step is one
  critic update and then one generator update (the paper's alternating algorithm);
- the generator input ``x = sigma(t_init) z`` at the time where ``sigma/alpha = sigma_init`` (EDM sigma 2.5;
  SD's t_init = 625 in SiD-LSG) -- ``FewStepGenerator.init_scale`` and ``t_list[0]``;
- LSG (SiD-LSG): guidance ``kappa_1`` for training the critic, ``kappa_2`` / ``kappa_3``
  for the critic's two terms in the generator loss, ``kappa_4`` for the teacher (all ``u + kappa (c - u)``);
  ``lsg = "zero_cfg"`` (teacher without CFG, critic without the condition, i.e. kappa_4 = 1, kappa_1..3 = 0)
  and ``lsg = "anti_cfg"`` (teacher without CFG, negative guidance ``anti_kappa`` on the critic in the
  generator loss) are the two settings named in the abstract of Few-step SiD (arXiv 2505.12674);
- few-step SiD: the generator has K steps; a step-determined k in 1..K (the same on every rank and after
  resume) picks which output is matched -- k - 1 no-grad steps from noise, the k-th with gradient --
  so the student matches the data at a uniform mixture of its steps;
- optional SiDA (Zhou et al., arXiv 2410.14919): the critic doubles as a discriminator through a head on
  its bottleneck; real and generated images are noised with the same t and eps; the critic adds
  ``gan_weight_critic * (softplus(D(fake)) + softplus(-D(real)))`` and the generator
  ``gan_weight_student * C*H*W * softplus(-D(x_t))`` (SiDA rescales its per-pixel GAN loss by C*H*W so it
  sits on the scale of the pixel-summed SiD loss).

Config fields -> paper symbols: ``alpha`` = alpha (1.2; 1.0 for text-to-image); ``sigma_init`` = sigma_init
(EDM units; 0 skips the check of ``model.student_timesteps[0]``); ``t_min``/``t_max`` = the range of t for
the generator loss (LSG: 20/1000 .. 980/1000); ``critic_t_min``/``critic_t_max`` = same for the critic;
``kappa_1``..``kappa_4`` = LSG's kappa_1..kappa_4; ``lsg`` = "" | "zero_cfg" | "anti_cfg";
``anti_kappa`` = the critic's negative scale under Anti-CFG (our choice: the paper's value was not found);
``gan_weight_student`` / ``gan_weight_critic`` = SiDA's lambda_G (``lsg_gan``) / lambda_D (0 disables SiDA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fewstep.core import losses, timesteps
from fewstep.core.conditioning import Batch
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.guidance import guided
from fewstep.core.parameterization import from_x0
from fewstep.core.schedules import NoiseSchedule
from fewstep.core.timesteps import from_timesteps
from fewstep.errors import ConfigError
from fewstep.methods.base import Method, Parts, Turn, check_critic_config, require

LSG_MODES = ("", "zero_cfg", "anti_cfg")


@dataclass
class SiDConfig:
    """SiD / SiD-LSG hyperparameters (see the module docstring for the paper symbols)."""

    alpha: float = 1.2
    sigma_init: float = 2.5
    t_min: float = 0.02
    t_max: float = 0.98
    critic_t_min: float = 0.02
    critic_t_max: float = 0.98
    kappa_1: float = 1.0     # critic training
    kappa_2: float = 1.0     # critic in (y_real - y_fake)
    kappa_3: float = 1.0     # critic in the alpha term
    kappa_4: float = 1.0     # teacher
    lsg: str = ""
    anti_kappa: float = -1.0
    gan_weight_student: float = 0.0
    gan_weight_critic: float = 1e-2


def kappas(c: SiDConfig) -> tuple[float, float, float, float]:
    """(kappa_1, kappa_2, kappa_3, kappa_4) after applying a named LSG setting."""
    if c.lsg not in LSG_MODES:
        raise ConfigError(f"method.lsg {c.lsg!r} is not known; use '' (the kappas as given), zero_cfg or anti_cfg")
    if c.lsg == "zero_cfg":
        return 0.0, 0.0, 0.0, 1.0
    if c.lsg == "anti_cfg":
        return 1.0, c.anti_kappa, c.anti_kappa, 1.0
    return c.kappa_1, c.kappa_2, c.kappa_3, c.kappa_4


def init_time(schedule: NoiseSchedule, sigma_init: float) -> float:
    """The t (on the schedule's own grid) where ``sigma_t / alpha_t`` is closest to ``sigma_init``."""
    grid = torch.linspace(0, 1, getattr(schedule, "N", 1000))
    ratio = schedule.sigma(grid) / schedule.alpha(grid).clamp_min(1e-12)
    return float(grid[(ratio - sigma_init).abs().argmin()])


def sid_timesteps(schedule: NoiseSchedule, sigma_init: float = 2.5, K: int = 1) -> tuple[int, ...]:
    """Student timesteps ``t_i = t_init (1 - i / K)`` (Few-step SiD's grid), in the teacher's units."""
    n = schedule.N - 1 if schedule.kind == "vp" else schedule.N
    k0 = round(init_time(schedule, sigma_init) * n)
    return tuple(round(k0 * (1 - i / K)) for i in range(K))


class SiD(Method):
    """Critic and generator turns of SiD / SiD-LSG / few-step SiD over any ``Denoiser``."""

    name = "sid"
    Config = SiDConfig

    def __init__(self, cfg: SiDConfig, teacher: Denoiser, student: FewStepGenerator, critic: Denoiser,
                 head: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.kappa = kappas(cfg)
        self.teacher = teacher.requires_grad_(False)
        self.student, self.critic, self.head = student, critic, head
        self.turns = (Turn("critic"), Turn("student"))   # critic first: the generator sees the updated critic
        require(cfg.gan_weight_student == 0 or head is not None,
                "method.gan_weight_student > 0 (SiDA) needs a discriminator head: set model.gan_head true")

    @classmethod
    def build(cls, cfg: SiDConfig, parts: Parts) -> "SiD":
        """The generator's input is ``sigma(t_0) z``; ``t_0`` is checked against ``sigma_init`` so a wrong
        t-list is a one-line error, not a silently worse run."""
        schedule, ts = parts.teacher.schedule, tuple(parts.timesteps)
        want = sid_timesteps(schedule, cfg.sigma_init, len(ts)) if cfg.sigma_init > 0 else ts
        require(abs(ts[0] - want[0]) <= 1,
                f"model.student_timesteps starts at {ts[0]}, but SiD's generator input is at sigma/alpha = "
                f"{cfg.sigma_init} (timestep {want[0]} for this teacher); set model.student_timesteps "
                f"{','.join(map(str, want))}, or method.sigma_init 0 to keep your list")
        t0 = from_timesteps(ts, schedule)[0]
        critic = parts.critic()
        return cls(cfg, parts.teacher, parts.student(init_scale=float(schedule.sigma(t0))), critic,
                   parts.head(critic))

    @classmethod
    def validate(cls, cfg: SiDConfig, model, data) -> None:
        kappas(cfg)
        require(cfg.sigma_init >= 0, f"method.sigma_init {cfg.sigma_init} must be >= 0 (0 keeps your t-list)")
        check_critic_config(cfg, model, data, "SiDA's discriminator")

    def trainable(self):
        critic = self.critic.trainable_parameters() + (list(self.head.parameters()) if self.head is not None else [])
        return {"student": self.student.denoiser.trainable_parameters(), "critic": critic}

    def checkpoint_modules(self):
        return {"student": self.student, "critic": self.critic, **({"head": self.head} if self.head else {})}

    def mixture_step(self, step: int) -> int:
        """Few-step SiD's k - 1: a step-determined index into the t-list (0 for a one-step student)."""
        return self.draw(step, 29, self.student.K) if self.student.K > 1 else 0

    def forward(self, turn: str, batch: Batch, step: int):
        if turn == "student":
            return self.student_loss(batch, step)
        if turn == "critic":
            return self.critic_loss(batch, step)
        raise ValueError(f"SiD has turns 'critic' and 'student', not {turn!r}")

    def generate(self, batch: Batch, step: int):
        return self.student(batch.noise, batch.cond, self.mixture_step(step),
                            eps_fn=lambda i: batch.randn_like(batch.noise, 100 + i))

    def critic_pass(self, x_t, t, batch: Batch, scales, out: str = "sample", logits: bool = False):
        """The critic's guided outputs and, if asked, the head's logits read off the same pass (its first,
        conditional half when cond and uncond are batched)."""
        if not logits:
            return guided(self.critic, x_t, t, batch.cond, batch.uncond, scales, out), None
        with self.critic.backbone.tap() as feats:
            preds = guided(self.critic, x_t, t, batch.cond, batch.uncond, scales, out)
        return preds, self.head(feats[-1][: len(x_t)])

    def student_loss(self, batch: Batch, step: int):
        """SiD generator loss; no ``no_grad`` around teacher or critic: dL/dx_g runs through
        x_t into both (the critic's parameters are frozen by the loop for this turn)."""
        c = self.cfg
        _, k2, k3, k4 = self.kappa
        x_g, _, k = self.generate(batch, step)
        x_t, t = timesteps.noised(self.teacher.schedule, x_g, batch, 1, c.t_min, c.t_max)
        (y_real,) = guided(self.teacher, x_t, t, batch.cond, batch.uncond, (k4,))
        (y_fake, y_fake_2), logit = self.critic_pass(x_t, t, batch, (k2, k3), logits=c.gan_weight_student > 0)
        loss, logs = losses.sid(x_g, y_real, y_fake, c.alpha, None if k3 == k2 else y_fake_2)
        logs = {"loss/student/sid": loss.detach(), "student/mixture_step": torch.tensor(float(k)),
                "guidance/kappa_4": torch.tensor(k4), "guidance/kappa_2": torch.tensor(k2), **logs}
        if logit is not None:
            g = losses.gan_g(logit)
            loss = loss + c.gan_weight_student * x_g[0].numel() * g
            logs["loss/student/gan"] = g.detach()
        return loss, logs

    def critic_loss(self, batch: Batch, step: int):
        """Denoising loss of the (kappa_1-guided) fake score on detached generator samples."""
        c = self.cfg
        with torch.no_grad():
            x_g = self.generate(batch, step)[0]
        x_t, t = timesteps.noised(self.teacher.schedule, x_g, batch, 3, c.critic_t_min, c.critic_t_max)
        kind = self.critic.prediction_type
        (pred,), logit_fake = self.critic_pass(x_t, t, batch, (self.kappa[0],), kind, logits=self.head is not None)
        loss = losses.dsm(pred, from_x0(x_g, x_t, t, kind, self.critic.schedule))
        logs = {"loss/critic/dsm": loss.detach(), "guidance/kappa_1": torch.tensor(self.kappa[0])}
        if logit_fake is None:
            return loss, logs
        # SiDA noises real images with the same t and eps as the generated ones (salt 4 = noised()'s eps)
        xr_t = self.critic.schedule.add_noise(batch.x0_real, batch.randn_like(x_g, 4), t)
        d = losses.gan_d(self.head(self.critic.features(xr_t, t, batch.cond_real or batch.cond)[-1]), logit_fake)
        logs.update({"loss/critic/gan": d.detach(), "gan/p_fake": torch.sigmoid(logit_fake).mean().detach()})
        return loss + c.gan_weight_critic * d, logs
