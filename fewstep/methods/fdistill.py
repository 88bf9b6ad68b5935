"""f-distill: One-step Diffusion Models with f-Divergence Distribution Matching (Xu, Nie & Vahdat,
arXiv 2502.15681), as a delta of DMD2 (``methods/dmd2.py``).

Implements
- the f-divergence gradient: DMD's score-difference gradient weighted per sample by
  ``h(r) = f''(r) r^2`` at the density ratio ``r = p_teacher / q_student`` of the noisy sample
  (``losses.fdiv_weight``: reverse-KL 1, forward-KL r, Jensen-Shannon r/(1+r), squared Hellinger sqrt(r),
  Jeffreys 1 + r, Neyman 1/r);
- the ratio from the discriminator: ``r = exp(logit)`` with the logit clamped to
  [-logit_clip, logit_clip] and ``r`` to [ratio_min, ratio_max] (0.1, 20); the optimum of the
  non-saturating GAN loss has ``logit = log(p / q)``. The discriminator is DMD2's head on the critic's
  bottleneck, trained by DMD2's critic turn;
- the two-stage normalisation: ``r`` divided by a per-t-bin EMA of its mean (``bins`` bins over the schedule's
  time range [0, 1], or over [t_min, t_max] with ``bins_range = "t_range"``; each bin's EMA starts at 1, or at its
  first batch's mean with ``ratio_init = "first_batch"``; a registered buffer so checkpoints hold it), then ``h``
  divided by its batch mean. FastGen's implementation of the paper bins the scheduler's whole time range and
  starts its bins at 1, with EMA rate 0.0 for SD1.5 and 0.5 for ImageNet-64.
  Reverse-KL never reads the discriminator, so it reproduces DMD2 bit for bit.

Config fields -> paper symbols: every DMD2 field (same meaning), plus ``divergence`` = f;
``ratio_min``/``ratio_max`` = the clamp of r; ``logit_clip`` = the clamp of the logit; ``bins`` = the
number of t bins; ``ratio_ema`` = the EMA rate of the bin means (0 uses each batch's own bin means);
``bins_range`` = "schedule" | "t_range"; ``ratio_init`` = "one" | "first_batch".
The normalisations run over one micro-batch (all-reduced across processes when torch.distributed is up).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fewstep.core import losses
from fewstep.methods.base import has_real_images, require
from fewstep.methods.dmd2 import DMD2, DMD2Config


@dataclass
class FDistillConfig(DMD2Config):
    """DMD2's fields plus the f-divergence and its density-ratio normalisation."""

    divergence: str = "js"
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    logit_clip: float = 10.0
    bins: int = 10
    ratio_ema: float = 0.5
    bins_range: str = "schedule"
    ratio_init: str = "one"


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


class RatioBins(nn.Module):
    """Per-t-bin EMA of the density ratio's mean; ``mean`` starts at 1 (no rescaling before data)."""

    def __init__(self, bins: int, lo: float, hi: float, rate: float, first_batch: bool = False):
        super().__init__()
        self.lo, self.hi, self.rate, self.first_batch = lo, hi, rate, first_batch
        self.register_buffer("mean", torch.ones(bins))
        self.register_buffer("seen", torch.zeros(bins, dtype=torch.bool))

    def index(self, t: torch.Tensor) -> torch.Tensor:
        n = len(self.mean)
        return ((t.float() - self.lo) / max(self.hi - self.lo, 1e-12) * n).floor().long().clamp(0, n - 1)

    @torch.no_grad()
    def update_and_normalize(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Fold this batch's bin means into the EMA (with ``first_batch``, a bin's first batch sets it), then return
        ``r / mean[bin]``."""
        idx = self.index(t)
        n = len(self.mean)
        sums = _all_sum(torch.zeros(n, device=r.device).index_add_(0, idx, r.float()))
        counts = _all_sum(torch.zeros(n, device=r.device).index_add_(0, idx, torch.ones_like(r.float())))
        hit = counts > 0
        batch_mean = sums[hit] / counts[hit]
        keep = torch.full_like(batch_mean, self.rate)
        if self.first_batch:
            keep = torch.where(self.seen[hit], keep, torch.zeros_like(batch_mean))
        self.mean[hit] = keep * self.mean[hit] + (1 - keep) * batch_mean
        self.seen[hit] = True
        return r / (self.mean[idx] + 1e-6)


class FDistill(DMD2):
    """DMD2 with the per-sample f-divergence weight ``h(r)`` on the distribution-matching gradient."""

    name = "fdistill"
    Config = FDistillConfig

    def __init__(self, cfg: FDistillConfig, teacher, student, critic, head: nn.Module | None = None):
        divergence = losses.F_ALIASES.get(cfg.divergence, cfg.divergence)
        require(divergence in losses.F_DIVERGENCES, f"method.divergence {cfg.divergence!r} is not known; use one of "
                f"{', '.join(losses.F_DIVERGENCES)} (aliases {', '.join(losses.F_ALIASES)})")
        require((divergence == "reverse_kl" and cfg.gan_weight_student == 0) or head is not None,
                f"f-distill with {cfg.divergence!r} needs the discriminator head for the density ratio (and the "
                "GAN term): set model.gan_head true")
        super().__init__(cfg, teacher, student, critic, head)
        self.divergence = divergence
        lo, hi = (cfg.t_min, cfg.t_max) if cfg.bins_range == "t_range" else (0.0, 1.0)
        self.ratio = RatioBins(cfg.bins, lo, hi, cfg.ratio_ema, first_batch=cfg.ratio_init == "first_batch")

    @classmethod
    def validate(cls, cfg: FDistillConfig, model, data) -> None:
        super().validate(cfg, model, data)
        divergence = losses.F_ALIASES.get(cfg.divergence, cfg.divergence)
        require(divergence in losses.F_DIVERGENCES, f"method.divergence {cfg.divergence!r} is not known; use one of "
                f"{', '.join(losses.F_DIVERGENCES)} (aliases {', '.join(losses.F_ALIASES)})")
        require(divergence == "reverse_kl" or model.gan_head,
                f"method.divergence {cfg.divergence!r} reads the density ratio off a discriminator head: set "
                "model.gan_head true (or method.divergence reverse_kl, which is DMD2)")
        require(divergence == "reverse_kl" or has_real_images(data),
                f"method.divergence {cfg.divergence!r}: the density-ratio discriminator needs real images and "
                f"data.source {data.source!r} has none; set data.images to a folder of real images")
        require(0 < cfg.ratio_min <= cfg.ratio_max, f"method.ratio_min {cfg.ratio_min} / method.ratio_max "
                f"{cfg.ratio_max}: need 0 < ratio_min <= ratio_max")
        require(cfg.bins >= 1, f"method.bins {cfg.bins} must be at least 1")
        require(0 <= cfg.ratio_ema < 1, f"method.ratio_ema {cfg.ratio_ema} must be in [0, 1)")
        require(cfg.logit_clip > 0, f"method.logit_clip {cfg.logit_clip} must be > 0")
        require(cfg.bins_range in ("schedule", "t_range"), f"method.bins_range {cfg.bins_range!r} is not valid; use "
                "schedule (bins over the whole time range) or t_range (over [t_min, t_max])")
        require(cfg.ratio_init in ("one", "first_batch"), f"method.ratio_init {cfg.ratio_init!r} is not valid; use "
                "one or first_batch")

    def checkpoint_modules(self):
        return {**super().checkpoint_modules(), "ratio": self.ratio}

    def weights(self, logit: torch.Tensor | None, t: torch.Tensor):
        """``h(r)`` normalised to mean 1 (ones for reverse-KL) and its logs."""
        c = self.cfg
        if self.divergence == "reverse_kl":
            return torch.ones(len(t), device=t.device), {}
        r = logit.detach().float().clamp(-c.logit_clip, c.logit_clip).exp().clamp(c.ratio_min, c.ratio_max)
        r_norm = self.ratio.update_and_normalize(r, t)
        h = losses.fdiv_weight(r_norm, self.divergence, normalize=False)
        h = h / (_all_sum(h.sum()) / _all_sum(torch.tensor(float(len(h)), device=h.device))).clamp_min(1e-12)
        return h, {"fdiv/ratio_mean": r.mean(), "fdiv/ratio_normalized_mean": r_norm.mean(),
                   "fdiv/h_max": h.max(), "fdiv/h_min": h.min()}

    @property
    def needs_logit(self) -> bool:
        return self.divergence != "reverse_kl"

    def dm_loss(self, x, x0_real, x0_fake, logit, t):
        """DMD2's DM loss with each sample's gradient weighted by ``h(r)`` (the f-distill gradient above)."""
        h, hlogs = self.weights(logit, t)
        loss, logs = losses.dmd(x, x0_real, x0_fake, h)
        return loss, {**logs, **hlogs}
