"""Noise processes in continuous time.

Every process is ``x_t = alpha(t) * x0 + sigma(t) * eps`` with ``t`` in [0, 1] and ``t = 1`` the
noise end. Derivatives ``d_alpha``/``d_sigma`` let flow-matching outputs
``u = alpha' x0 + sigma' eps`` convert through x0 (see ``parameterization.py``).

``timestep(t)`` maps continuous time to the value a stock diffusers pipeline feeds the backbone
(``round(t * 999)`` for VP UNets trained on 1000 integer steps, ``t * 1000`` for flow models), so an
adapter can be pinned against the stock scheduler.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector ``[B]`` so it broadcasts against ``like`` ``[B, ...]`` (float32, or float64
    where ``like`` is float64: the x0 conversion runs in double precision)."""
    v = torch.as_tensor(v, device=like.device, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


class NoiseSchedule:
    """Forward process ``x_t = alpha(t) x0 + sigma(t) eps`` for continuous ``t`` in [0, 1]."""

    kind = "base"

    def alpha(self, t: Tensor, dtype=torch.float32) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor, dtype=torch.float32) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor, dtype=torch.float32) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor, dtype=torch.float32) -> Tensor:
        raise NotImplementedError

    def timestep(self, t: Tensor) -> Tensor:
        """The backbone's ``timestep`` argument for continuous ``t`` (stock-pipeline convention)."""
        raise NotImplementedError

    def quantize(self, t: Tensor) -> Tensor:
        """Snap ``t`` to the times the backbone was trained on (identity for continuous processes)."""
        return t

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Sample ``q(x_t | x0)``."""
        return bcast(self.alpha(t), x0) * x0 + bcast(self.sigma(t), x0) * eps

    def transition(self, x_s: Tensor, s: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Sample ``q(x_t | x_s)`` for ``t >= s``: ``x_t = a x_s + b eps`` with ``a = alpha_t / alpha_s``,
        ``b^2 = sigma_t^2 - a^2 sigma_s^2`` (Phased DMD, arXiv 2510.27684, subinterval forward process)."""
        a = self.alpha(t) / self.alpha(s)
        b2 = (self.sigma(t) ** 2 - a ** 2 * self.sigma(s) ** 2).clamp_min(0.0)
        return bcast(a, x_s) * x_s + bcast(b2.sqrt(), x_s) * eps

    def check_t(self, t: Tensor) -> None:
        """Reject times outside [0, 1] with a message that names them: a backbone timestep such as 999 passed
        as t would otherwise be clamped to 1 and silently mean pure noise. On a GPU the check is asynchronous
        (no host sync per call): a bad t fails at the next synchronisation."""
        t = torch.as_tensor(t)
        ok = (t >= 0) & (t <= 1)       # False for nan too
        if t.is_cuda:
            torch._assert_async(ok.all(), "time t is outside [0, 1]")
        elif not bool(ok.all()):
            raise ValueError(f"time t={t.flatten()[:8].tolist()} is outside [0, 1]; fewstep uses continuous t "
                             "in [0, 1] with t = 1 the noise end (divide a 0..999 timestep by 999)")


class VPDiscrete(NoiseSchedule):
    """Variance-preserving process of a DDPM-trained model (SD1.5/2.1/SDXL, PixArt, the digits teacher).

    ``alpha(t)^2 = alphas_cumprod[k]`` at ``k = t * (N - 1)``; between integers log(alphas_cumprod) is
    interpolated linearly so the process and its derivatives are defined for every t.
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: Tensor):
        # float64 table: 1 - alphas_cumprod near t = 0 loses digits in float32.
        self.log_abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).log()
        self.N = len(self.log_abar)

    @classmethod
    def from_betas(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                   beta_schedule: str = "linear") -> "VPDiscrete":
        """Betas exactly as diffusers' DDPMScheduler builds them (linear, scaled_linear, squaredcos_cap_v2)."""
        n = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            f = lambda i: math.cos((i + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731 (Nichol & Dhariwal 2021, eq. 17)
            betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
        else:
            raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; use linear, scaled_linear or "
                             "squaredcos_cap_v2")
        return cls(torch.cumprod(1.0 - betas, dim=0))

    def _interp(self, t: Tensor) -> tuple[Tensor, Tensor]:
        k = torch.as_tensor(t, dtype=torch.float64).clamp(0, 1) * (self.N - 1)
        # a float32 t = k / (N - 1) misses the integer k by ~1e-5: snap it, so grid times read the table exactly
        # (as diffusers' alphas_cumprod[k]) rather than an interpolation a few 1e-9 off
        near = k.round()
        k = torch.where((k - near).abs() < 1e-4, near, k)
        lo = k.floor().clamp(max=self.N - 2).long()
        table = self.log_abar.to(k.device)
        slope = table[lo + 1] - table[lo]
        return table[lo] + slope * (k - lo), slope * (self.N - 1)

    def alpha(self, t, dtype=torch.float32):
        return (0.5 * self._interp(t)[0]).exp().to(dtype)

    def sigma(self, t, dtype=torch.float32):
        return (-torch.expm1(self._interp(t)[0])).clamp_min(0).sqrt().to(dtype)

    def d_alpha(self, t, dtype=torch.float32):
        log_abar, dlog = self._interp(t)
        return (0.5 * (0.5 * log_abar).exp() * dlog).to(dtype)

    def d_sigma(self, t, dtype=torch.float32):
        log_abar, dlog = self._interp(t)
        return (-log_abar.exp() * dlog / (2 * (-torch.expm1(log_abar)).sqrt())).to(dtype)

    def timestep(self, t):
        return (torch.as_tensor(t, dtype=torch.float32) * (self.N - 1)).round()

    def quantize(self, t):
        return self.timestep(t) / (self.N - 1)


class RectifiedFlow(NoiseSchedule):
    """Rectified flow (SD3, Flux, Sana, Wan): ``alpha = 1 - t``, ``sigma = t``; u = eps - x0.

    Timestep shifts live in ``timesteps.py`` (they reparameterize which t is sampled, not the process).
    """

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000):
        self.N = num_train_timesteps

    def alpha(self, t, dtype=torch.float32):
        return 1.0 - torch.as_tensor(t).to(dtype)

    def sigma(self, t, dtype=torch.float32):
        return torch.as_tensor(t).to(dtype)

    def d_alpha(self, t, dtype=torch.float32):
        return -torch.ones_like(torch.as_tensor(t).to(dtype))

    def d_sigma(self, t, dtype=torch.float32):
        return torch.ones_like(torch.as_tensor(t).to(dtype))

    def timestep(self, t):
        return torch.as_tensor(t, dtype=torch.float32) * self.N


class TrigFlow(NoiseSchedule):
    """TrigFlow (sCM, arXiv 2410.11081): ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``."""

    kind = "trig"

    def alpha(self, t, dtype=torch.float32):
        return torch.cos(torch.as_tensor(t).to(dtype) * math.pi / 2)

    def sigma(self, t, dtype=torch.float32):
        return torch.sin(torch.as_tensor(t).to(dtype) * math.pi / 2)

    def d_alpha(self, t, dtype=torch.float32):
        return -math.pi / 2 * self.sigma(t, dtype)

    def d_sigma(self, t, dtype=torch.float32):
        return math.pi / 2 * self.alpha(t, dtype)

    def timestep(self, t):
        return torch.as_tensor(t, dtype=torch.float32) * (math.pi / 2)


def from_diffusers(scheduler) -> NoiseSchedule:
    """Build the process a diffusers scheduler (or its config dict) describes.

    DDPM/DDIM/LCM/TCD/Euler (anything with betas) -> VPDiscrete; FlowMatch* -> RectifiedFlow.
    """
    config = dict(getattr(scheduler, "config", scheduler))
    name = config.get("_class_name", type(scheduler).__name__)
    schedule = _from_config(config, name)
    # kept so a student can be saved and rebuilt without its teacher (FewStepGenerator.save_pretrained)
    schedule.config = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    schedule.config["_class_name"] = name
    return schedule


def _from_config(config: dict, name: str) -> NoiseSchedule:
    # Sana's DPMSolver and Wan's UniPC carry betas but sample rectified flow when use_flow_sigmas is set.
    if "FlowMatch" in name or config.get("process") == "flow" or config.get("use_flow_sigmas"):
        return RectifiedFlow(config.get("num_train_timesteps", 1000))
    if "beta_schedule" in config or "process" in config:
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
            return VPDiscrete(torch.cumprod(1 - betas, 0))
        return VPDiscrete.from_betas(config.get("num_train_timesteps", 1000), config.get("beta_start", 1e-4),
                                     config.get("beta_end", 0.02), config.get("beta_schedule", "linear"))
    raise ValueError(f"cannot derive a noise process from scheduler {name!r}; fewstep supports DDPM/DDIM-style "
                     "(betas) and FlowMatchEulerDiscrete schedulers")


def prediction_type_of(scheduler) -> str:
    """diffusers prediction type of a teacher's scheduler; flow-match schedulers predict ``flow_prediction``."""
    config = dict(getattr(scheduler, "config", scheduler))
    if "FlowMatch" in config.get("_class_name", type(scheduler).__name__) or config.get("use_flow_sigmas"):
        return "flow_prediction"
    return config.get("prediction_type", "epsilon")
