"""Time-sampling densities on [0, 1] (t = 1 is noise), as maps from uniform draws.

k-diffusion's ``make_sample_density`` idea: each loss term names a density; the draw ``u ~ U[0, 1)``
comes from the batch's per-sample seeds, and ``schedule.quantize`` snaps t to the backbone's training
grid (integer timesteps for VP UNets).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fewstep.core.conditioning import Batch
from fewstep.core.schedules import NoiseSchedule


def uniform(u: Tensor, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """t ~ U[lo, hi] (DMD2 uses U[0.02, 0.98] for the distribution-matching term)."""
    return lo + (hi - lo) * u


DENSITIES = {"uniform": uniform}


def sample(density: str, u: Tensor, schedule: NoiseSchedule, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Map uniform draws ``u`` to times from ``density`` on [lo, hi], snapped to the backbone's grid."""
    if density not in DENSITIES:
        raise ValueError(f"unknown time density {density!r}; use one of {', '.join(DENSITIES)}")
    return schedule.quantize(DENSITIES[density](u, lo, hi))


def noised(schedule: NoiseSchedule, x0: Tensor, batch: Batch, salt: int, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """``x_t = alpha x0 + sigma eps`` at ``t ~ U[lo, hi]``, t and eps drawn from the batch's per-sample seeds
    (salts ``salt`` and ``salt + 1``); keeps the graph to ``x0``."""
    t = sample("uniform", batch.rand(salt, x0.device), schedule, lo, hi)
    return schedule.add_noise(x0, batch.randn_like(x0, salt + 1), t), t


def from_timesteps(timesteps, schedule: NoiseSchedule) -> Tensor:
    """Continuous times of a stock-scheduler timestep list, e.g. [999, 749, 499, 249] -> t = k / 999 (VP)."""
    ts = torch.as_tensor(list(timesteps), dtype=torch.float32)
    n = schedule.N - 1 if schedule.kind == "vp" else schedule.N
    if len(ts) == 0 or (ts < 0).any() or (ts > n).any():
        raise ValueError(f"timesteps {list(timesteps)} are outside the schedule's range [0, {n}]; "
                         f"give values such as [{n}] (one step) or [{n}, {3 * n // 4}, {n // 2}, {n // 4}]")
    if len(ts) > 1 and not (ts[1:] < ts[:-1]).all():
        raise ValueError(f"timesteps {list(timesteps)} must be strictly descending (noise first)")
    return ts / n


def ddim_grid(schedule: NoiseSchedule, S: int) -> Tensor:
    """The S + 1 times of the teacher's DDIM: timesteps ``tau_top - i N / S`` for i < S (diffusers' trailing
    spacing), then t = 0."""
    top = float(schedule.timestep(torch.tensor(1.0)))
    t = schedule.quantize(torch.tensor([top - i * schedule.N / S for i in range(S)]) / top)
    return torch.cat([t.float(), torch.zeros(1)])
