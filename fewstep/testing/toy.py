"""An exact toy teacher: a Gaussian mixture whose denoiser is known in closed form.

For ``x0 ~ sum_k pi_k N(mu_k, s^2 I)`` under a VP process ``x_t = alpha x0 + sigma eps``,
``x_t | k ~ N(alpha mu_k, v I)`` with ``v = alpha^2 s^2 + sigma^2``, so

    gamma_k(x_t) = softmax_k(log pi_k - |x_t - alpha mu_k|^2 / (2 v))            (responsibilities)
    E[x0 | x_t]  = sum_k gamma_k (mu_k + (alpha s^2 / v) (x_t - alpha mu_k))        (posterior mean)

``ToyGMMModel`` returns that posterior mean as an epsilon / v / sample prediction (diffusers convention),
plus a small learnable 1x1-conv residual whose output layer starts at zero: the teacher is exact, and a
copy of it (student or critic) starts exact and can adapt. Samples are D-channel images; each pixel is an
independent draw (1x1 images for the tests), so image-shaped code paths (``bcast``, ``ConvHead``) work
unchanged. The hidden activations of ``mid`` are the features a discriminator head taps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from fewstep.backbones import adapter_for, register_adapter
from fewstep.core.denoiser import Denoiser
from fewstep.core.schedules import VPDiscrete
from fewstep.testing.toy_adapter import ToyAdapter
from fewstep.training.data import ClassLabelSource

NUM_FREQS = 4   # Fourier features of t fed to the residual


@dataclass
class ToyOutput(BaseOutput):
    sample: Tensor


class ToyGMMModel(ModelMixin, ConfigMixin):
    """Exact GMM denoiser + zero-initialised learnable residual (in x0 space), as a diffusers model."""

    @register_to_config
    def __init__(self, means: list = ((-1.5, 0.0), (1.5, 0.0)), weights: list = (0.3, 0.7), std: float = 0.2,
                 num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                 beta_start: float = 1e-4, beta_end: float = 0.02, prediction_type: str = "v_prediction",
                 hidden: int = 64):
        super().__init__()
        mu = torch.as_tensor(means, dtype=torch.float32)
        pi = torch.as_tensor(weights, dtype=torch.float32)
        if mu.ndim != 2 or len(mu) != len(pi) or (pi <= 0).any():
            raise ValueError(f"means must be [K, D] and weights K positive numbers; got {list(mu.shape)} "
                             f"and {pi.tolist()}")
        self.register_buffer("mu", mu, persistent=False)
        self.register_buffer("log_pi", (pi / pi.sum()).log(), persistent=False)
        self.schedule = VPDiscrete.from_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
        D = mu.shape[1]
        self.inp = nn.Conv2d(D + 1 + 2 * NUM_FREQS, hidden, 1)
        self.mid = nn.Sequential(nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU())
        self.out = nn.Conv2d(hidden, D, 1)
        nn.init.zeros_(self.out.weight)   # the residual starts at zero: every copy starts exact
        nn.init.zeros_(self.out.bias)

    @property
    def dim(self) -> int:
        return self.mu.shape[1]

    def alpha_sigma(self, timestep, like: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha, sigma`` of the (interpolated) training timestep, shaped ``[B, 1, 1, 1]``."""
        t = torch.as_tensor(timestep, dtype=torch.float32, device=like.device).expand(len(like))
        t = t / (self.schedule.N - 1)
        shape = (len(like),) + (1,) * (like.ndim - 1)
        return self.schedule.alpha(t).to(like).reshape(shape), self.schedule.sigma(t).to(like).reshape(shape)

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Exact ``E[x0 | x_t]`` of the mixture (module docstring)."""
        s2 = self.config.std ** 2
        v = alpha ** 2 * s2 + sigma ** 2                                     # [B, 1, 1, 1]
        centers = alpha.unsqueeze(1) * self.mu[None, :, :, None, None]       # [B, K, D, 1, 1]
        diff = x_t.unsqueeze(1) - centers                                     # [B, K, D, H, W]
        logits = self.log_pi[None, :, None, None] - (diff ** 2).sum(2) / (2 * v)
        gamma = torch.softmax(logits, dim=1).unsqueeze(2)                     # [B, K, 1, H, W]
        x0_k = self.mu[None, :, :, None, None] + (alpha * s2 / v).unsqueeze(1) * diff
        return (gamma * x0_k).sum(1)

    def residual(self, x_t: Tensor, timestep) -> Tensor:
        t = torch.as_tensor(timestep, dtype=x_t.dtype, device=x_t.device).expand(len(x_t)) / self.schedule.N
        k = torch.arange(1, NUM_FREQS + 1, device=x_t.device, dtype=x_t.dtype)
        feats = torch.cat([t[:, None], torch.sin(math.pi * t[:, None] * k), torch.cos(math.pi * t[:, None] * k)], 1)
        feats = feats[:, :, None, None].expand(-1, -1, *x_t.shape[2:])
        return self.out(self.mid(self.inp(torch.cat([x_t, feats], 1))))

    def forward(self, sample: Tensor, timestep, class_labels: Tensor | None = None, return_dict: bool = True):
        """Prediction of type ``config.prediction_type``; ``class_labels`` is accepted and ignored (the
        mixture is unconditional, so guidance is a no-op)."""
        alpha, sigma = self.alpha_sigma(timestep, sample)
        x0 = self.posterior_mean(sample, alpha, sigma) + self.residual(sample, timestep)
        kind = self.config.prediction_type
        if kind == "sample":
            out = x0
        else:
            eps = (sample - alpha * x0) / sigma
            out = eps if kind == "epsilon" else alpha * eps - sigma * x0
        return ToyOutput(sample=out) if return_dict else (out,)

    # ---------------------------------------------------------------- data and evaluation helpers
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws from the mixture, shaped ``[n, D, 1, 1]``."""
        k = torch.multinomial(self.log_pi.exp().cpu(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator)
        return (self.mu.cpu()[k] + self.config.std * eps)[:, :, None, None]

    def true_mean(self) -> Tensor:
        return (self.log_pi.exp()[:, None] * self.mu).sum(0)

    def true_weights(self) -> Tensor:
        return self.log_pi.exp()

    def mode_weights(self, samples: Tensor) -> Tensor:
        """Fraction of ``samples`` ([N, D, ...], every pixel a draw) nearest to each mode centre."""
        x = samples.detach().float().movedim(1, -1).reshape(-1, self.dim)
        idx = torch.cdist(x, self.mu.to(x)).argmin(1)
        return torch.bincount(idx, minlength=len(self.mu)).float() / len(x)

    def mean(self, samples: Tensor) -> Tensor:
        """Per-dimension mean of ``samples`` ([N, D, ...], every pixel a draw)."""
        return samples.detach().float().movedim(1, -1).reshape(-1, self.dim).mean(0)


def toy_source(model: ToyGMMModel, batch_size: int, seed: int = 0, n_real: int = 4096):
    """A batch source over the mixture: one dummy class (label 0, null label 1), unit noise, real draws."""
    real = model.sample_data(n_real, torch.Generator().manual_seed(seed + 1))
    return ClassLabelSource(real, torch.zeros(n_real, dtype=torch.long), 1, 1, batch_size, seed)


def toy_denoiser(model: ToyGMMModel):
    """The model as a ``Denoiser`` on its own VP schedule (what ``build.load_teacher`` gives a real teacher)."""
    return Denoiser(adapter_for(model, model.config.prediction_type), model.schedule)


register_adapter("ToyGMMModel", ToyAdapter)
