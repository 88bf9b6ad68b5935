"""The few-step student: a denoiser evaluated on an explicit t-list.

Sampling is "predict x0, then re-noise to the next time" (DMD2 arXiv 2405.14867 section 4.5; the
multistep consistency sampler of LCM arXiv 2310.04378 alg. 1 without boundary scalings). The same rule
runs in ``pipelines/scheduling_fewstep.py``, so an exported student reproduces this sampler exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .conditioning import Cond
from .denoiser import Denoiser
from .schedules import bcast


def subset_indices(K: int, n: int) -> list[int]:
    """Which of K trained steps an n-step call uses: ``round(linspace(0, K, n, endpoint=False))``."""
    if not 1 <= n <= K:
        raise ValueError(f"num_inference_steps={n} but the student was trained for {K} step(s); use 1..{K}")
    return [int(i) for i in np.round(np.linspace(0, K, n, endpoint=False))]


class FewStepGenerator(nn.Module):
    """Student generator ``G(noise, cond)`` over the descending time list ``t_list`` (t = 1 is noise).

    ``init_scale`` multiplies the unit-variance input noise (SiD feeds ``sigma(t_init) z``, not ``z``).
    """

    def __init__(self, denoiser: Denoiser, t_list, init_scale: float = 1.0):
        super().__init__()
        self.denoiser = denoiser
        self.register_buffer("t_list", torch.as_tensor(t_list, dtype=torch.float32), persistent=False)
        self.init_scale = init_scale

    @property
    def K(self) -> int:
        return len(self.t_list)

    def renoise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        s = self.denoiser.schedule
        return bcast(s.alpha(t), x0) * x0 + bcast(s.sigma(t), x0) * eps

    def step(self, x: Tensor, i: int, cond: Cond) -> Tensor:
        """x0 predicted at the i-th time of the list."""
        t = self.t_list[i].to(x.device).expand(len(x))
        return self.denoiser(x, t, cond)

    def forward(self, noise: Tensor, cond: Cond, k: int = 0, eps_fn=None) -> tuple[Tensor, Tensor, int]:
        """Backward simulation (DMD2 section 4.5): run steps 0..k-1 without gradient from fresh noise,
        then the k-th step with gradient. ``eps_fn(i)`` gives the re-noising draw after step i (default
        ``randn_like``). Returns ``(x0, x_k, k)``: the trained output and its input."""
        x = noise * self.init_scale
        if k:
            with torch.no_grad():
                for i in range(k):
                    eps = eps_fn(i) if eps_fn is not None else torch.randn_like(x)
                    x = self.renoise(self.step(x, i, cond), self.t_list[i + 1].expand(len(x)), eps)
        return self.step(x, k, cond), x, k

    def indices(self, n: int) -> list[int]:
        """Which trained steps an n-step call uses (a subclass exported with another scheduler overrides it
        to follow that scheduler's rule)."""
        return subset_indices(self.K, n)

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Cond, generator: torch.Generator | None = None,
               steps: int | None = None) -> Tensor:
        """Full sampling chain; re-noising draws ``randn(x.shape, generator)`` exactly as the exported
        ``FewStepScheduler.step`` does, so both give the same images for the same generator."""
        idx = self.indices(steps or self.K)
        x = noise * self.init_scale
        for j, i in enumerate(idx):
            x0 = self.step(x, i, cond)
            if j == len(idx) - 1:
                return x0
            # drawn on the generator's device, then moved (diffusers' randn_tensor does the same), so a CPU
            # generator gives the same images on every device
            gen_device = generator.device if generator is not None else x.device
            eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
            x = self.renoise(x0, self.t_list[idx[j + 1]].expand(len(x)), eps)
        return x
