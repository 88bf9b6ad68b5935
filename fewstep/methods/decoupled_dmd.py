"""Decoupled DMD: CFG Augmentation as the Spear, Distribution Matching as the Shield (Liu et al., ICLR 2026,
arXiv 2511.22677), as a delta over DMD2 (arXiv 2405.14867, ``dmd2.py``) and Phased DMD (arXiv 2510.27684,
``phased_dmd.py``).

With the real score guided, ``s_real = s_T^u + alpha (s_T^c - s_T^u)``, DMD's gradient splits into
- DM = s_T^c - s_F^c (teacher cond minus critic cond): distribution matching, which acts as the regulariser;
- CA = (alpha - 1)(s_T^c - s_T^u), "CFG augmentation": the term that does the many- to few-step conversion.
Implemented:
- the decoupled schedule: each term at its own re-noising of the student output x, DM at ``x_{t_DM}`` with
  ``t_DM ~ U[t_min, t_max]`` (DMD2's draw), CA at ``x_{t_CA}`` with ``t_CA`` only below the noise level at
  which the trained student step takes its input. The paper writes tau_CA ~ U(t, 1) with t = 0 noise; here
  t = 1 is noise, so ``t_CA ~ U[t_min, t_gen - ca_margin]``, t_gen the step's entry of the t-list (backward
  simulation's index), t_min standing for the data end as in DMD2's DM range. This is the paper's hybrid,
  the best of its 4-step Lumina-Image-2.0 ablation (HPS v2.1 32.29 against 30.61 for DMD's coupled draw);
- the gradient in x0 space (``losses.dmd``, DMD eq. 7-8: x0 and score are affine at a fixed (x_t, t), so x0
  differences stand for score differences up to DMD's per-time weighting):
  ``g = [dm_weight (x0_F^c - x0_T^c)(x_{t_DM}) + ca_weight (alpha - 1)(x0_T^u - x0_T^c)(x_{t_CA})] / w`` with
  DMD's normaliser ``w = mean|x - x0_hat|`` against the guided teacher x0 assembled from both samples,
  ``x0_hat = x0_T^c(x_{t_DM}) + ca_weight (alpha - 1)(x0_T^c - x0_T^u)(x_{t_CA})``. One normaliser divides
  both terms, as in DMD2, where both sit inside ``x0_fake - x0_real``: so with the CA sample equal to the DM
  sample (``ca_range = "same"``) and both weights 1 this is DMD2 bit for bit, and ``ca_weight`` there is DMD2
  at guidance 1 + ca_weight (alpha - 1). The proxy loss is DMD's, ``0.5 |x - sg(x - g)|^2`` (the paper's
  ``|G - sg(G + lambda Delta)|^2`` with Delta = -g w);
- DMD2's GAN term, unchanged, on the DM sample (where the critic runs; on SDXL the paper kept DMD2's recipe,
  GAN included, changing only the schedule), and the critic turn of DMD2 / Phased DMD, unchanged;
- the optional per-image mean/variance regulariser the paper tried in place of DM,
  ``L_KL = (1/B) sum_i 0.5 [(s_i^2 + (m_i - m*)^2) / s*^2 - 1 - log(s_i^2 / s*^2)]``, m_i and s_i^2 the mean
  and variance of sample i (``mean_variance_kl``);
- the phased variant: a ``PhasedDecoupledDMDConfig`` runs the same turns inside Phased DMD's phases, both
  samples drawn from the phase's subinterval transition, ``t_CA`` below the step's input time there too.

Cost per student step: the teacher runs cond at x_{t_DM} and cond + uncond at x_{t_CA} (3 batch-sized
passes, 2 of them as one batched call) against DMD2's 2, so one extra teacher forward; the critic runs once,
as in DMD2. With ``ca_range = "same"`` there is no extra pass, and with guidance 1 the CA pass is skipped.

Config fields -> paper symbols: ``guidance_scale`` = alpha, the real-score CFG scale of both terms (the other
DMD2 fields as in DMD2);
``ca_range`` = where t_CA is drawn (``below``: the paper's tau_CA > t; ``full``: U[t_min, t_max]
independently of t_DM, the paper's "decoupled, both full range"; ``same``: DM's sample, i.e. DMD2);
``ca_margin`` = the gap kept below t_gen (at least half the backbone's time grid, 0.0005 on 1000 VP steps,
so that snapping to the grid cannot reach t_gen); ``dm_weight`` = the weight of the DM term;
``ca_weight`` = the weight of the CA term; ``kl_weight`` = the weight of L_KL (0: off);
``kl_mean`` = m* (the paper: 0.075 on SDXL latents); ``kl_var`` = s*^2 (the paper: 0.81 on SDXL latents).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.core import losses, timesteps
from fewstep.core.conditioning import Batch
from fewstep.core.guidance import guided
from fewstep.methods.base import require
from fewstep.methods.dmd2 import DMD2, DMD2Config
from fewstep.methods.phased_dmd import PhasedDMD, PhasedDMDConfig

CA_RANGES = ("below", "full", "same")
CA_SALT = 11    # the CA sample's draws (t, eps); DMD2 uses 1-6 and 100+ for its own


@dataclass
class DecoupledDMDConfig(DMD2Config):
    """DMD2's fields plus the decoupled schedule, the terms' weights and the mean/variance regulariser."""

    ca_range: str = "below"
    ca_margin: float = 0.001
    dm_weight: float = 1.0
    ca_weight: float = 1.0
    kl_weight: float = 0.0
    kl_mean: float = 0.0
    kl_var: float = 1.0


@dataclass
class PhasedDecoupledDMDConfig(DecoupledDMDConfig, PhasedDMDConfig):
    """Phased DMD's fields plus the decoupled ones: method ``decoupled_dmd`` runs it phase by phase."""


def mean_variance_kl(x: torch.Tensor, mean: float, var: float, eps: float = 1e-12) -> torch.Tensor:
    """``(1/B) sum_i 0.5 [(v_i + (m_i - mean)^2) / var - 1 - log(v_i / var)]``, m_i / v_i the mean / (biased)
    variance of sample i: the KL from N(m_i, v_i) to N(mean, var). Gradient with respect to x_ij (N values per
    sample): ``[(m_i - mean) / var + (1 / var - 1 / v_i)(x_ij - m_i)] / (B N)``."""
    x = x.float().flatten(1)
    m, v = x.mean(1), x.var(1, unbiased=False).clamp_min(eps)
    return (0.5 * ((v + (m - mean) ** 2) / var - 1 - torch.log(v / var))).mean()


class DecoupledDMD(DMD2):
    """DMD2 with the DM and CA terms of its gradient at their own noise levels."""

    name = "decoupled_dmd"
    Config = DecoupledDMDConfig

    def __init__(self, cfg: DecoupledDMDConfig, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.check(cfg)
        if cfg.ca_range == "below":
            for k in range(self.student.K):
                lo, hi = self.ca_window(k)
                require(lo <= hi, f"method.ca_margin {cfg.ca_margin}: student step {k} takes its input at t = "
                        f"{float(self.student.t_list[k]):.4f}, leaving no CA time in [{lo:.4f}, t - ca_margin]; "
                        "lower method.t_min (or method.ca_margin), or set method.ca_range full")

    @classmethod
    def variant(cls, cfg) -> type[DecoupledDMD]:
        """The class that runs ``cfg``: the phased variant for a ``PhasedDecoupledDMDConfig``."""
        return PhasedDecoupledDMD if isinstance(cfg, PhasedDMDConfig) and not issubclass(cls, PhasedDMD) else cls

    @classmethod
    def build(cls, cfg: DecoupledDMDConfig, parts) -> DecoupledDMD:
        impl = cls.variant(cfg)
        return impl.build(cfg, parts) if impl is not cls else super().build(cfg, parts)

    @classmethod
    def validate(cls, cfg: DecoupledDMDConfig, model, data) -> None:
        impl = cls.variant(cfg)
        if impl is not cls:
            return impl.validate(cfg, model, data)
        super().validate(cfg, model, data)
        cls.check(cfg)

    @staticmethod
    def check(cfg: DecoupledDMDConfig) -> None:
        require(cfg.ca_range in CA_RANGES, f"method.ca_range {cfg.ca_range!r} is not valid; use "
                f"{' or '.join(CA_RANGES)}")
        require(0 < cfg.ca_margin < 1, f"method.ca_margin {cfg.ca_margin} must be in (0, 1): t_CA stays that far "
                "below the student step's input time")
        require(cfg.dm_weight >= 0 and cfg.ca_weight >= 0, f"method.dm_weight {cfg.dm_weight} / method.ca_weight "
                f"{cfg.ca_weight} must be >= 0")
        require(cfg.kl_weight >= 0 and cfg.kl_var > 0, f"method.kl_weight {cfg.kl_weight} must be >= 0 and "
                f"method.kl_var {cfg.kl_var} > 0")

    # ------------------------------------------------------------------ the two samples
    def output(self, batch: Batch, step: int):
        """``(x, renoise, k, logs)``: the student output, ``renoise(salt, lo, hi) -> (x_t, t)`` with t drawn in
        [lo, hi], and the trained step k (its input time is ``t_list[k]``)."""
        x, _, k = self.generate(batch, step)
        sch = self.teacher.schedule
        return (x, lambda salt, lo, hi: timesteps.noised(sch, x, batch, salt, lo, hi), k,
                {"student/sim_step": torch.tensor(float(k))})

    def ca_window(self, k: int) -> tuple[float, float]:
        """``[lo, hi]`` of t_CA for student step k under ``ca_range = "below"``."""
        c = self.cfg
        return c.t_min, min(c.t_max, float(self.student.t_list[k]) - c.ca_margin)

    def draws(self, batch: Batch, step: int):
        """``(x, (x_dm, t_dm), (x_ca, t_ca), logs)``: the output and its DM and CA samples."""
        c = self.cfg
        x, renoise, k, logs = self.output(batch, step)
        dm = renoise(1, c.t_min, c.t_max)
        if c.ca_range == "same":
            return x, dm, dm, logs
        lo, hi = self.ca_window(k) if c.ca_range == "below" else (c.t_min, c.t_max)
        return x, dm, renoise(CA_SALT, lo, hi), logs

    def student_loss(self, batch: Batch, step: int):
        """DM at x_{t_DM} + CA at x_{t_CA} (+ DMD2's GAN term, + the optional L_KL)."""
        x, (x_dm, t_dm), (x_ca, t_ca), logs = self.draws(batch, step)
        same = x_ca is x_dm
        loss, dm_logs = self.distribution_matching(x, x_dm, t_dm, batch, None if same else x_ca,
                                                   None if same else t_ca)
        return loss, {**logs, **dm_logs}

    # ------------------------------------------------------------------ the gradient
    def teacher_x0(self, x_t, t, batch: Batch, x_ca, t_ca):
        """``(x0_T^c at x_t, x0_T^c at x_ca, guided x0_T at x_ca)`` in float64; ``x_ca`` None: the CA sample
        is x_t, and one batched pass gives all three (DMD2's pass: its guided x0 is DMD2's x0_real)."""
        w, f64 = self.cfg.guidance_scale, torch.float64
        if x_ca is None:
            x0_c, x0_g = guided(self.teacher, x_t.detach(), t, batch.cond, batch.uncond, (1.0, w), dtype=f64)
            return x0_c, x0_c, x0_g
        x0_c = self.teacher(x_t.detach(), t, batch.cond, dtype=f64)
        if w == 1:      # no guidance: CA is zero, its pass is skipped
            return x0_c, x0_c, x0_c
        x0_c_ca, x0_g_ca = guided(self.teacher, x_ca.detach(), t_ca, batch.cond, batch.uncond, (1.0, w), dtype=f64)
        return x0_c, x0_c_ca, x0_g_ca

    def distribution_matching(self, x, x_t, t, batch: Batch, x_ca=None, t_ca=None):
        """The student objective: the decoupled DM + CA gradient (module docstring) with DM at ``(x_t, t)`` and
        CA at ``(x_ca, t_ca)`` (None: at x_t), DMD2's GAN term at x_t, and L_KL on x."""
        c = self.cfg
        with torch.no_grad():
            x0_c, x0_c_ca, x0_g_ca = self.teacher_x0(x_t, t, batch, x_ca, t_ca)
            # x0_hat and x0_c + dm_weight (x0_F - x0_c), summed in this order so that at weights 1 and one
            # sample they are DMD2's x0_real and x0_fake whatever the rounding: (x0_c - x0_c_ca) and
            # (1 - dm_weight) x0_c are then exact zeros
            x0_real = c.ca_weight * x0_g_ca + (x0_c - c.ca_weight * x0_c_ca)
        logit = None
        if self.use_gan:    # only the GAN term differentiates through the critic (frozen this turn) to x_t
            x0_critic, logit = self.logits(x_t, t, batch.cond, dtype=torch.float64)
            x0_critic = x0_critic.detach()
        else:
            with torch.no_grad():
                x0_critic = self.critic(x_t.detach(), t, batch.cond, dtype=torch.float64)
        x0_fake = c.dm_weight * x0_critic + (1 - c.dm_weight) * x0_c
        loss, logs = self.dm_loss(x, x0_real, x0_fake, logit, t)
        logs = {"loss/student/dmd": loss.detach(), **logs,
                "decoupled/dm_abs": (x0_critic - x0_c).abs().mean().float(),
                "decoupled/ca_abs": (x0_g_ca - x0_c_ca).abs().mean().float(),
                "decoupled/t_ca": (t if t_ca is None else t_ca).float().mean()}
        if self.use_gan:
            g = losses.gan_g(logit)
            loss = loss + c.gan_weight_student * g
            logs["loss/student/gan"] = g.detach()
        if c.kl_weight:
            kl = mean_variance_kl(x, c.kl_mean, c.kl_var)
            loss = loss + c.kl_weight * kl
            logs["loss/student/kl"] = kl.detach()
        return loss, logs


class PhasedDecoupledDMD(DecoupledDMD, PhasedDMD):
    """Decoupled DMD phase by phase (built for a ``PhasedDecoupledDMDConfig``; the method name stays
    ``decoupled_dmd``): both samples come from the phase's subinterval transition, CA's below the step's input."""

    Config = PhasedDecoupledDMDConfig

    def output(self, batch: Batch, step: int):
        x0, x_s, s, e = self.generate(batch, step)
        return (x0, lambda salt, lo, hi: self.subinterval(x_s, s, e, batch, salt, lo, hi)[:2], self.sim_step(step),
                {"phase": torch.tensor(float(self.phase(step)))})

    def ca_window(self, k: int) -> tuple[float, float]:
        """As DMD2's, inside the subinterval of step k's phase (``subinterval`` clamps to it too)."""
        lo, hi = super().ca_window(k)
        s, _ = self.student.interval(self.student.phase_of_step[k])
        return max(lo, s + self.cfg.margin), hi
