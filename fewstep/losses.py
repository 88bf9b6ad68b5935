"""Loss terms as pure functions of tensors.

Each docstring states the gradient with respect to the generator output so ``tests/test_losses.py``
can check autograd against the closed form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every axis but the batch axis, kept broadcastable: ``[B, 1, 1, ...]``."""
    return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


def dmd(x: Tensor, x0_real: Tensor, x0_fake: Tensor, eps: float = 1e-6) -> tuple[Tensor, dict]:
    """Distribution matching loss (DMD, Yin et al. CVPR 2024, arXiv 2311.18828, eq. 7-8; DMD2 arXiv 2405.14867).

    ``g = (x0_fake - x0_real) / w`` with the per-sample normalizer ``w = mean|x - x0_real|`` (eq. 8),
    computed in float32; loss ``0.5 * mean((x - sg(x - g))^2)`` so that ``d loss / d x = g / x.numel()``.
    """
    x32, real, fake = x.float(), x0_real.detach().float(), x0_fake.detach().float()
    with torch.no_grad():
        w = per_sample_mean((x32 - real).abs()).clamp_min(eps)
        g = torch.nan_to_num((fake - real) / w)
        target = x32 - g
    loss = 0.5 * F.mse_loss(x32, target)
    logs = {"dmd/normalizer": w.mean(), "dmd/abs_real_minus_fake": (real - fake).abs().mean(),
            "grad_norm/student/dmd_term": g.norm() / x.numel()}
    return loss, logs


def dsm(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Denoising score matching: ``mean(weight * (pred - target)^2)`` in the backbone's output space
    (Vincent 2011; the fake-score loss of DMD/DMD2 and SiD)."""
    err = (pred.float() - target.detach().float()) ** 2
    if weight is not None:
        err = weight * err
    return err.mean()


def gan_g(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``softplus(-D(fake))`` (Goodfellow et al. 2014; DMD2 section 4.2)."""
    return F.softplus(-logits_fake.float()).mean()


def gan_d(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss ``softplus(D(fake)) + softplus(-D(real))`` (DMD2 section 4.2)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()
