"""Classifier-free guidance in one convention: ``uncond + w * (cond - uncond)``.

w = 1 is no guidance. A peer config using ``cond + w (cond - uncond)`` means w + 1 here
(``from_plus_one``). Because x0, eps, v and flow outputs are affine in each other at a fixed
``(x_t, t)``, guidance gives the same result in every output space (EDM2's lerp between denoisers).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .conditioning import Cond


def cfg(denoiser, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond, w: float, out: str = "sample") -> Tensor:
    """``D_u + w (D_c - D_u)`` with one batched backbone pass; ``w == 1`` skips the unconditional pass."""
    if w == 1.0:
        return denoiser(x_t, t, cond, out)
    t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(len(x_t))
    d_c, d_u = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat(cond, uncond), out).chunk(2)
    return d_u + w * (d_c - d_u)


def from_plus_one(w_plus_one: float) -> float:
    """Convert a guidance scale written as ``cond + w (cond - uncond)`` to fewstep's convention."""
    return w_plus_one + 1.0
