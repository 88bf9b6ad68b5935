"""Consistency distillation: latent consistency models (LCM, Luo et al. 2023, arXiv 2310.04378; consistency
models, Song et al. 2023, arXiv 2303.01469) and their segmented variants, Hyper-SD's trajectory segmented
consistency distillation (TSCD, arXiv 2404.13686) and phased consistency models (PCM, arXiv 2405.18407).

Implemented (LCM's latent consistency distillation, as diffusers' train_lcm_distill_* scripts run it):

- the consistency function ``f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t)`` with the boundary scalings
  ``c_skip = sigma_data^2 / ((10 tau)^2 + sigma_data^2)``, ``c_out = 10 tau / sqrt((10 tau)^2 + sigma_data^2)``,
  sigma_data = 0.5, tau the backbone timestep (``schedule.timestep(t)``, 0..999 for VP), exactly as
  diffusers' ``LCMScheduler`` computes them: ``f(x, 0) = x``;
- the DDIM teacher solver of the CFG-augmented PF-ODE from ``t_{n+k}`` to ``t_n``: ``x_prev = alpha_{t_n} x0_w
  + sigma_{t_n} eps_w`` with ``x0_w = x0_u + w (x0_c - x0_u)`` and eps_w implied by it, on LCM's grid of
  N = ``num_ddim_steps`` times (skip k = 1000 / N = 20), from real data ``x_{t_{n+k}} = alpha x0 + sigma eps``;
- ``w ~ U[w_min, w_max]`` per sample in fewstep's convention ``uncond + w (cond - uncond)``. LCM writes
  ``cond + omega (cond - uncond)`` and the diffusers scripts sample omega in [5, 15] (SD1.5) or [3, 15]
  (LCM-LoRA), so w = omega + 1; the optional w-embedding (``Cond.guidance``, UNet ``timestep_cond``) embeds
  omega = w - 1, as diffusers pipelines feed ``guidance_scale - 1``;
- the loss ``d(f_theta(x_{t_{n+k}}, t_{n+k}), f_theta^-(x_prev, t_n))`` with the pseudo-Huber distance and an
  EMA target ``theta^- <- mu theta^- + (1 - mu) theta`` after every step. In lora mode the target is the
  student without gradient (LCM-LoRA; an EMA would copy the shared base) and the teacher is the base with
  adapters disabled (``build._lora_role``);
- segments (TSCD / PCM): M segments with upper edges ``1 - m / M`` (timesteps 999, 749, 499, 249 for M = 4).
  A start time in ``(s, e]`` maps onto the lower edge s by ``F_s(x, t) = alpha_s x0_f + sigma_s eps(x0_f)``, the
  DDIM jump with the boundary-scaled ``x0_f = f(x, t)`` (``F_0 = f``); the solver step is clipped at s, and
  ``F_s(x, s) = x`` is the boundary condition at every edge. PCM's c_skip = 0, c_out = 1 equal ours to 1e-5
  at tau >= 20. M = 1 is plain LCM; ``segment_schedule`` (e.g. 8, 4, 2, 1) runs TSCD's stages, equal budgets.

Sampling: with one final segment, LCM's multistep sampler (boundary-scaled x0, fresh noise to the next time),
exported as a stock ``LCMScheduler`` with ``original_inference_steps = K``, so ``num_inference_steps=K`` gives
the student's t-list. With M > 1 final segments the student jumps deterministically between its segment edges
(PCM's sampler; DDIM eta = 0 / TCD gamma = 0), exported as ``FewStepScheduler(renoise="ddim",
timestep_scaling=10)``. ``TCDScheduler(timestep_spacing="trailing")`` with eta = 0 takes the same jumps but
ends at timestep 0's noise level without scalings (off by sigma_0: 0.006 cosine, 0.03 SD betas): the recipe for
stock text-to-image pipelines, not a bit-exact one.

Config fields -> paper symbols: ``w_min``/``w_max`` = omega range + 1; ``num_ddim_steps`` = N (k = T / N);
``target_decay`` = mu (0.95); ``huber_c`` = c (0.001; 0 = l2); ``timestep_scaling`` = 10; ``segments`` = M;
``segment_schedule`` = TSCD's stages; ``w_embedding``/``w_embedding_dim`` = LCM's w-condition (dim 256).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fewstep.core import losses
from fewstep.core.conditioning import Batch, Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator, ddim_step
from fewstep.core.schedules import NoiseSchedule, bcast
from fewstep.errors import ConfigError
from fewstep.methods.base import Method, Parts, Turn, has_real_images, require


@dataclass
class ConsistencyConfig:
    """LCM / TSCD / PCM hyperparameters (see the module docstring for the paper symbols)."""

    w_min: float = 2.0
    w_max: float = 2.0
    w_embedding: bool = False
    w_embedding_dim: int = 256
    num_ddim_steps: int = 50
    target_decay: float = 0.95
    huber_c: float = 1e-3
    timestep_scaling: float = 10.0
    segments: int = 1
    segment_schedule: tuple[int, ...] = ()


def guidance_embedding(omega, dim: int):
    """Sinusoidal embedding of ``1000 omega`` (LCM's w-condition; diffusers feeds ``guidance_scale - 1``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=omega.device) / (half - 1))
    arg = 1000.0 * omega.float()[:, None] * freqs[None]
    emb = torch.cat([arg.sin(), arg.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def with_w_condition(denoiser: Denoiser, dim: int) -> None:
    """Give a full-copy student LCM's w-condition input (``time_cond_proj_dim``); the new projection starts at
    zero so the student starts as the teacher (LCM's script keeps the default init)."""
    model = denoiser.backbone.model
    if "time_cond_proj_dim" not in model.config or isinstance(denoiser.adapter, str):
        raise ConfigError("method.w_embedding needs a full-mode backbone with a timestep_cond input "
                          "(time_cond_proj_dim, e.g. UNet2DConditionModel); leave it off for this teacher")
    config = {k: v for k, v in model.config.items() if k != "_use_default_values"}   # it would reset the dim
    new = type(model).from_config({**config, "time_cond_proj_dim": dim})
    missing = set(new.load_state_dict(model.state_dict(), strict=False).missing_keys)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name in missing:
                p.zero_()
    denoiser.backbone.model = new.to(next(model.parameters()).device)


def segment_edges(schedule: NoiseSchedule, M: int):
    """Upper edges of M equal segments, descending from the noise end (999, 749, 499, 249 for M = 4, VP)."""
    top = float(schedule.timestep(torch.tensor(1.0)))
    return schedule.quantize(torch.tensor([top - m * schedule.N / M for m in range(M)]) / top)


class Consistency(Method):
    """Consistency distillation with one ``Turn("student")``; the target network moves in ``after_step``."""

    name = "consistency"
    Config = ConsistencyConfig
    turns = (Turn("student"),)

    @classmethod
    def build(cls, cfg: ConsistencyConfig, parts: Parts) -> "Consistency":
        student = parts.student()
        if cfg.w_embedding:
            with_w_condition(student.denoiser, cfg.w_embedding_dim)
        return cls(cfg, parts.teacher, student, parts.total_steps)

    @classmethod
    def validate(cls, cfg: ConsistencyConfig, model, data) -> None:
        stages = tuple(cfg.segment_schedule) or (cfg.segments,)
        require(min(stages) >= 1, f"method.segments / method.segment_schedule {list(stages)}: need >= 1 segment")
        require(0 <= cfg.w_min <= cfg.w_max, f"method.w_min {cfg.w_min} / method.w_max {cfg.w_max}: need "
                "0 <= w_min <= w_max")
        require(cfg.num_ddim_steps >= 1, f"method.num_ddim_steps {cfg.num_ddim_steps} must be at least 1")
        require(0 <= cfg.target_decay < 1, f"method.target_decay {cfg.target_decay} must be in [0, 1)")
        require(cfg.huber_c >= 0, f"method.huber_c {cfg.huber_c} must be >= 0 (0 = l2)")
        require(cfg.timestep_scaling > 0, f"method.timestep_scaling {cfg.timestep_scaling} must be > 0")
        require(not cfg.w_embedding or model.mode == "full", "method.w_embedding needs model.mode full (the "
                "w-condition projection is a new layer of the student copy)")
        require(has_real_images(data), f"consistency distillation noises real images and data.source "
                f"{data.source!r} has none; set data.images to a folder of real images (captions in <name>.txt)")

    def __init__(self, cfg: ConsistencyConfig, teacher: Denoiser, student: FewStepGenerator, total_steps: int):
        super().__init__()
        self.cfg, self.teacher, self.total_steps = cfg, teacher.requires_grad_(False), max(int(total_steps), 1)
        self.stages = tuple(cfg.segment_schedule) or (cfg.segments,)
        renoise = "ddim" if self.stages[-1] > 1 else "fresh"
        # LCM's sampler (fresh noise, LCMScheduler's floor rule for fewer steps) or PCM's deterministic jumps
        self.student = FewStepGenerator(student.denoiser, student.t_list, student.init_scale, renoise=renoise,
                                        timestep_scaling=cfg.timestep_scaling,
                                        subset="floor" if renoise == "fresh" else "round")
        self._check_t_list(teacher.schedule)
        # lora: the adapter shares the teacher's base, so the target is the student itself (no copy)
        shared = isinstance(student.denoiser.adapter, str) or cfg.target_decay == 0
        self.target = None if shared else copy.deepcopy(student.denoiser).requires_grad_(False)

    def _check_t_list(self, sch: NoiseSchedule) -> None:
        ts = [int(round(float(v))) for v in sch.timestep(self.student.t_list)]
        K, M = len(ts), self.stages[-1]
        if M > 1 and ts != [int(round(float(v))) for v in sch.timestep(segment_edges(sch, M))]:
            raise ConfigError(f"model.student_timesteps {ts}: a student with {M} final segments samples on its "
                              f"segment edges; use {[int(v) for v in sch.timestep(segment_edges(sch, M))]}")
        if M == 1 and sch.kind == "vp" and ts != [sch.N // K * j - 1 for j in range(K, 0, -1)]:
            raise ConfigError(f"model.student_timesteps {ts}: LCMScheduler(original_inference_steps={K}) samples "
                              f"{[sch.N // K * j - 1 for j in range(K, 0, -1)]}; use that list")

    def trainable(self):
        return {"student": self.student.denoiser.trainable_parameters()}

    def checkpoint_modules(self):
        return {"student": self.student} | ({"target": self.target} if self.target is not None else {})

    def segments_at(self, step: int) -> int:
        """Segments of the stage that ``step`` belongs to (equal step budgets per stage)."""
        return self.stages[min(step * len(self.stages) // self.total_steps, len(self.stages) - 1)]

    def times(self, batch: Batch, step: int, device):
        """Per-sample start time t_{n+k} on the DDIM grid, its solver target t_n and segment lower edge s."""
        sch, N = self.teacher.schedule, self.cfg.num_ddim_steps
        top = float(sch.timestep(torch.tensor(1.0)))
        j = (batch.rand(0, device) * N).floor().clamp(max=N - 1)
        t = sch.quantize((top - j * sch.N / N) / top)
        edges = segment_edges(sch, self.segments_at(step)).to(device)
        s = torch.where(edges[None] < t[:, None], edges[None], torch.zeros_like(edges[None])).amax(1)
        t_n = torch.maximum(sch.quantize((t - sch.N / N / top).clamp_min(0)), s)
        return t, t_n, s

    def forward(self, turn: str, batch: Batch, step: int):
        if turn != "student":
            raise ValueError(f"consistency distillation has one turn, 'student', not {turn!r}")
        c, sch = self.cfg, self.teacher.schedule
        x0 = batch.x0_real.float()
        cond = batch.cond_real if batch.cond_real is not None else batch.cond
        t, t_n, s = self.times(batch, step, x0.device)
        x_t = sch.add_noise(x0, batch.randn_like(x0, 1), t)
        w = c.w_min + (c.w_max - c.w_min) * batch.rand(2, x0.device)
        cond_w = replace(cond, guidance=guidance_embedding(w - 1, c.w_embedding_dim)) if c.w_embedding else cond
        target_net = self.target if self.target is not None else self.student.denoiser
        with torch.no_grad():
            x0_c, x0_u = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat(cond, batch.uncond)).chunk(2)
            x_prev = ddim_step(sch, x_t, t, t_n, x0_u + bcast(w, x0_u) * (x0_c - x0_u))
            target = self.student.jump(target_net, x_prev, t_n, s, cond_w)
        pred = self.student.jump(self.student.denoiser, x_t, t, s, cond_w)
        loss = losses.pseudo_huber(pred, target, c.huber_c)
        return loss, {"loss/student/consistency": loss.detach(), "consistency/segments": torch.tensor(
            float(self.segments_at(step))), "consistency/w": w.mean(), "consistency/t": t.mean()}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA target update ``theta^- <- mu theta^- + (1 - mu) theta``."""
        if self.target is not None:
            for p_tgt, p in zip(self.target.parameters(), self.student.denoiser.parameters()):
                p_tgt.lerp_(p.detach().to(p_tgt.dtype), 1 - self.cfg.target_decay)
