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


def dmd(x: Tensor, x0_real: Tensor, x0_fake: Tensor, h: Tensor | None = None,
        eps: float = 1e-6) -> tuple[Tensor, dict]:
    """Distribution matching loss (DMD, Yin et al. CVPR 2024, arXiv 2311.18828, eq. 7-8; DMD2 arXiv 2405.14867).

    ``g = (x0_fake - x0_real) / w`` with the per-sample normalizer ``w = mean|x - x0_real|`` (eq. 8),
    computed in float64 as the official DMD2 does (the difference of two close x0 estimates loses digits in
    float32 at low noise); loss ``0.5 * mean((x - sg(x - g))^2)`` so that ``d loss / d x = g / x.numel()``.
    ``h``: an optional per-sample weight on the gradient (f-distill's ``h(r)``); ``h = 1`` is DMD exactly.
    """
    x64, real, fake = x.detach().double(), x0_real.detach().double(), x0_fake.detach().double()
    with torch.no_grad():
        w = per_sample_mean((x64 - real).abs()).clamp_min(eps)
        g = torch.nan_to_num((fake - real) / w)
        if h is not None:
            g = g * h.detach().double().reshape((-1,) + (1,) * (x.ndim - 1))
        target = (x64 - g).float()
    loss = 0.5 * F.mse_loss(x.float(), target)
    logs = {"dmd/normalizer": w.mean().float(), "dmd/abs_real_minus_fake": (real - fake).abs().mean().float(),
            "grad_norm/student/dmd_term": (g.norm() / x.numel()).float()}
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


def sid(x_g: Tensor, y_real: Tensor, y_fake: Tensor, alpha: float = 1.2, y_fake_2: Tensor | None = None,
        eps: float = 1e-5) -> tuple[Tensor, dict]:
    """Score identity Distillation generator loss (Zhou et al., ICML 2024, arXiv 2404.04057;
    SiD-LSG arXiv 2406.01561 with kappa_2 / kappa_3 for the two critic terms).

    ``L = mean_b sum_pixels d * ((y_real - x_g) - alpha (y_real - y_fake_2)) / w_b``, ``d = y_real - y_fake``,
    ``w_b = sg(mean_pixels |x_g - y_real|)`` (per sample), with ``y_fake_2 = y_fake`` unless given.
    ``y_real``, ``y_fake`` must keep their graphs to ``x_g`` through ``x_t = a x_g + s eps``: the
    gradient runs through both frozen networks. With ``J_r = dy_real/dx_t``, ``J_f = dy_fake/dx_t``
    (``J_f2`` for ``y_fake_2``) and ``e = (y_real - x_g) - alpha (y_real - y_fake_2)``:

        dL/dx_g = (1 / (B w_b)) [ -d + a J_r^T (e + d - alpha d) - a J_f^T e + alpha a J_f2^T d ]

    which for ``y_fake_2 = y_fake`` is ``(1 / (B w_b)) [ -d + a J_r^T (e + (1 - alpha) d) - a J_f^T (e - alpha d) ]``.
    The leading ``-d / w`` is DMD's direction; the rest is what distinguishes SiD from DMD.
    """
    x32, real, fake = x_g.float(), y_real.float(), y_fake.float()
    fake2 = fake if y_fake_2 is None else y_fake_2.float()
    with torch.no_grad():
        w = per_sample_mean((x32 - real).abs()).clamp_min(eps)
    d = real - fake
    per_sample = (d * ((real - x32) - alpha * (real - fake2)) / w).flatten(1).sum(1)
    loss = per_sample.mean()
    logs = {"sid/normalizer": w.mean(), "sid/abs_real_minus_fake": d.detach().abs().mean(),
            "sid/abs_real_minus_x": (real - x32).detach().abs().mean()}
    return loss, logs


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "squared_hellinger", "jeffreys", "neyman")
F_ALIASES = {"rkl": "reverse_kl", "kl": "forward_kl", "sh": "squared_hellinger", "jf": "jeffreys"}


def fdiv_weight(r: Tensor, divergence: str, normalize: bool = True) -> Tensor:
    """Per-sample weight ``h(r) = f''(r) r^2`` of the f-divergence gradient, normalised to mean 1
    (f-distill, Xu, Nie & Vahdat, arXiv 2502.15681), with ``r = p / q`` the
    teacher-over-student density ratio:

        reverse_kl 1 | forward_kl r | js r / (1 + r) | squared_hellinger sqrt(r) | jeffreys 1 + r | neyman 1 / r

    Constant factors of ``f''`` (1/2 for Hellinger, 2 for Neyman) cancel in the normalisation by the batch
    mean of ``h`` (``normalize=False`` returns raw ``h``, for a mean taken over a larger batch). The weight
    is a constant to the generator: nothing is differentiated through it.
    """
    name = F_ALIASES.get(divergence, divergence)
    r = r.detach().float()
    if name == "reverse_kl":
        h = torch.ones_like(r)
    elif name == "forward_kl":
        h = r
    elif name == "js":
        h = r / (1 + r)
    elif name == "squared_hellinger":
        h = r.sqrt()
    elif name == "jeffreys":
        h = 1 + r
    elif name == "neyman":
        h = 1 / r.clamp_min(1e-8)
    else:
        raise ValueError(f"unknown f-divergence {divergence!r}; use one of {', '.join(F_DIVERGENCES)} "
                         f"(aliases {', '.join(F_ALIASES)})")
    # h / 1.0 is exact, so reverse KL leaves DMD's gradient bit-identical
    return h / h.mean().clamp_min(1e-12) if normalize else h


def pseudo_huber(pred: Tensor, target: Tensor, c: float = 1e-3) -> Tensor:
    """Pseudo-Huber loss ``mean(sqrt((pred - target)^2 + c^2) - c)`` (improved consistency training, Song &
    Dhariwal 2023, arXiv 2310.14189; the LCM scripts use c = 0.001 elementwise). ``c = 0`` falls back to the l2 loss
    ``mean((pred - target)^2)``. Gradient: ``d loss / d pred = (pred - target) / sqrt((pred - target)^2 + c^2)
    / pred.numel()``: l2-like for errors below c, l1-like (robust) above."""
    d = pred.float() - target.detach().float()
    if c <= 0:
        return (d ** 2).mean()
    return (torch.sqrt(d ** 2 + c * c) - c).mean()
