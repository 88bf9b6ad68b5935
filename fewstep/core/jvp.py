"""Forward-mode derivatives of a denoiser along a direction of its inputs: the tangents sCM and MeanFlow train on.

For a denoiser or flow map ``F(x, t[, r])`` (any output type) and a direction ``(dx, dt[, dr])``,

    jvp(F) = d/ds F(x + s dx, t + s dt, r + s dr) at s = 0 = dF/dx . dx + dF/dt dt + dF/dr dr

in one forward pass with ``torch.func.jvp`` (no double backward). The methods that need it:

- MeanFlow (arXiv 2505.13447): the MeanFlow identity ``u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t)``
  with the total derivative ``d/dt u = v . du/dz + du/dt``: the tangent of ``u`` along ``(dx, dt, dr) = (v, 1, 0)``;
  the regression target ``sg(v - (t - r) d/dt u)``.
- sCM (arXiv 2410.11081): the continuous-time consistency tangent, the total derivative
  ``d/dt f(x_t, t) = (partial_x f) . dx_t/dt + partial_t f`` of the TrigFlow consistency function
  ``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)`` (t the angle), with ``dx_t/dt`` the teacher's
  PF-ODE velocity: the tangent along ``(dx_t/dt, 1)``.

Attention. diffusers' processors call ``F.scaled_dot_product_attention``; in torch 2.14.1 on CPU it dispatches
to ``_scaled_dot_product_flash_attention_for_cpu``, which has no forward-mode formula (``torch.func.jvp`` raises
NotImplementedError); torch's CUDA flash and memory-efficient kernels are not known to have one either (not
checked on a GPU here). The math backend is composite (``softmax(Q K^T / sqrt(d)) V`` in matmul and softmax,
with masks), so forward AD goes through it.
``jvp`` runs under ``jvp_attention()``, which selects that backend for every processor of every family
(joint attention, RoPE, QK norms and masks stay the family's own code) instead of replacing processors with a
plain-math copy of each. It materialises the ``[B, heads, N, N]`` scores: fine for the tiny and mid-size
models, not for long video token sequences (those need a JVP flash kernel or finite differences).

Time. The tangent in ``t`` must see the backbone's time input move: ``VPDiscrete.timestep`` rounds ``t (N - 1)``
to the trained integers, whose derivative is zero. ``continuous(denoiser)`` is the same denoiser with the
timestep unrounded (every fewstep process maps ``t`` to the timestep linearly: ``(N - 1) t``, ``N t``,
``pi t / 2``); at a VP grid time it equals the rounded call up to float error. A VP process also interpolates
``log alpha_bar`` linearly between grid times and snaps within 1e-4 steps of one, so the derivative of its
x0 conversion in ``t`` is that of the interpolation (and zero in the snap window): take ``t`` off the grid, or
``out`` equal to the backbone's own prediction type (no conversion), when the ``t`` tangent matters.

Precision. The function is ``predict`` itself: the backbone in its dtype (fp32 or bf16; tangents follow the
primal dtype through the casts), the conversion in float64, the result in ``dtype``. The primal output keeps
its autograd graph to the parameters (MeanFlow's loss is on ``u``); the tangent has one too: detach it for a
stop-gradient target (both papers), which frees that graph.

Not covered: gradient-checkpointed blocks and FSDP-sharded parameters under ``torch.func.jvp`` (untested), and a
finite-difference fallback for backbones whose attention cannot run on the math backend.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.schedules import NoiseSchedule
from fewstep.core.two_time import predict


@contextmanager
def jvp_attention():
    """``F.scaled_dot_product_attention`` on its math backend, which supports forward-mode AD."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


class ContinuousTime:
    """A noise process whose backbone timestep is not rounded: ``timestep(t) = t * timestep(1)``; everything
    else (``alpha``, ``sigma``, their derivatives, ``check_t``) is the wrapped process's."""

    def __init__(self, schedule: NoiseSchedule):
        self.base = schedule
        self.slope = float(schedule.timestep(torch.ones(())))

    def timestep(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32) * self.slope

    def __getattr__(self, name: str):
        if name == "base":      # not set yet (copy, unpickling): no recursion through the delegation
            raise AttributeError(name)
        return getattr(self.base, name)


def continuous(denoiser: Denoiser) -> Denoiser:
    """The same backbone, role and process, with continuous timesteps (what ``jvp`` differentiates)."""
    return Denoiser(denoiser.backbone, ContinuousTime(denoiser.schedule), denoiser.adapter)


def _times(v, n: int, device) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float32, device=device).expand(n).clone()


def jvp(denoiser: Denoiser, x_t: Tensor, t, cond: Cond, dx: Tensor, dt, r=None, dr=None, out: str = "sample",
        dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """``(F, dF)``: ``F = predict(continuous(denoiser), x_t, t, cond, r, out, dtype)`` and its derivative
    along ``(dx, dt[, dr])``. ``t``, ``dt``, ``r``, ``dr`` are per sample ``[B]`` or scalars; ``dr`` defaults
    to 0 (``r`` held fixed); with ``r=None`` the call is one-time (no target time, no ``dr``).
    """
    n, device = len(x_t), x_t.device
    if r is None and dr is not None:
        raise ValueError("dr given without r: a one-time call has no target time to move")
    d = continuous(denoiser)
    primals = [x_t, _times(t, n, device)]
    tangents = [dx.to(x_t.dtype), _times(dt, n, device)]
    if r is not None:
        primals.append(_times(r, n, device))
        tangents.append(_times(0.0 if dr is None else dr, n, device))

    def f(x, t, *r):
        return predict(d, x, t, cond, r[0] if r else None, out, dtype)

    with jvp_attention():
        return torch.func.jvp(f, tuple(primals), tuple(tangents))
