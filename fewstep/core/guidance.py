"""Classifier-free guidance in one convention: ``uncond + w * (cond - uncond)``.

w = 1 is no guidance; a peer config written as ``cond + w (cond - uncond)`` means w + 1 here. Because x0,
eps, v and flow outputs are affine in each other at a fixed ``(x_t, t)``, guidance gives the same result in
every output space (EDM2's lerp between denoisers).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fewstep.core.conditioning import Cond


def guided(denoiser, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond, scales, out: str = "sample",
           dtype=torch.float32) -> list[Tensor]:
    """``D_u + w (D_c - D_u)`` for each w in ``scales`` from at most one batched backbone pass: conditional only
    when every w is 1, unconditional only when every w is 0 (SiD-LSG's Zero-CFG critic never sees the condition)."""
    if all(w == 1.0 for w in scales):
        return [denoiser(x_t, t, cond, out, dtype)] * len(scales)
    if all(w == 0.0 for w in scales):
        return [denoiser(x_t, t, uncond, out, dtype)] * len(scales)
    t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(len(x_t))
    d_c, d_u = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat(cond, uncond), out, dtype).chunk(2)
    return [d_u + w * (d_c - d_u) for w in scales]


def cfg(denoiser, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond, w: float, out: str = "sample",
        dtype=torch.float32) -> Tensor:
    """``D_u + w (D_c - D_u)`` with one batched backbone pass; ``w == 1`` skips the unconditional pass."""
    return guided(denoiser, x_t, t, cond, uncond, (w,), out, dtype)[0]
