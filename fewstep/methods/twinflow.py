"""TwinFlow: Cheng, Sun, Li and Lin, "TwinFlow: Realizing One-step Generation on Large Models with Self-adversarial
Flows" (ICLR 2026, arXiv 2512.05150), on the two-time student of ``fewstep.core.two_time``.

One network ``F(x_t, t, r)`` on the flow path ``x_t = (1 - t) x + t e`` (velocity ``e - x``; a jump
``x_r = x_t - (t - r) F``), with time extended to [-1, 1]: the positive half is the real trajectory (noise -> data),
the negative half a "fake" trajectory (noise -> the model's own one-step output). No teacher copy, critic or
discriminator is trained. Each batch is split, in order, into four groups (fractions ``frac_*``):

- ``e2e``: t = 1, r = 0 (the one-step jump); ``mul``: r = t - u gap t (r close to t: flow matching);
  ``any``: r = t - u t; ``adv``: x replaced by the model's own one-step fakes ``x_f = z - F(z, 1, 0)`` (no
  gradient), trained by flow matching ``F(x_t, -t, -t) -> e - x_f`` on the negative half;
- the target of every non-adv sample is RCGM's N-th order consistency target: with v the (enhanced) target
  velocity, ``x' = x_t - delta v`` and ``t_m = max(t - delta, r)``, the target network's N-step estimate
  ``D = x' - x_r'`` (N equal jumps ``x <- x - (t_c - t_n) F^-(x, t_c, t_n)`` from t_m to r) gives the residual
  ``R = ((t - r) F - D) / delta - v`` (``F - v`` where t - r < delta) and the target ``sg(F - clip(R, -1, 1))``:
  a finite-difference form of ``d/dt [(t - r) F] = v``;
- training-time CFG ("enhanced target"): ``v = (e - x) + gamma (v_c - v_u)`` of the target network at (x_t, t),
  on non-adv samples with ``guidance_t_min < t < guidance_t_max`` (so not the e2e group at t = 1 for the default
  (0, 1)); with ``ema_decay = 1`` the frozen model's own ``v_u + gamma (v_c - v_u)`` replaces e - x there;
- the rectification loss on the e2e group: fresh noise and t' ~ U(0, 1) noise the one-step outputs,
  ``dv = clip(F(x_t', -t') - F(x_t', t'), -1, 1)`` of the online model without gradient, and
  ``L_rect = L(F, sg(F - dv))`` with weight ``rect_weight``: distribution matching as velocity matching;
- ``L = mean_b w_b L(F_b, target_b) + rect_weight mean_e2e L_rect``, per-sample ``w = tan((1 - (|t| - |r|)) pi /
  2.5) + 1`` (1 on adv), ``L`` Barron's reweighted l2: ``mse sg((mse / c^2 / |alpha - 2| + 1)^((alpha - 2) / 2)) / c``
  (weight 1 at alpha = 2), mse the per-sample mean squared error; t ~ U(0, 1) (the code's Beta(1, 1)).

The target network (``ema_decay`` mu, the code's ``ema_decay_rate``): 0 < mu < 1 an EMA copy of the student, moved
after each step with the code's ramp ``c_0 = 0, c_{k+1} = c_k + (1 - c_k)(mu - c_k) / 2`` (the SD3.5 full run, 0.99);
mu = 0 the online student without gradient (the code's FSDP Qwen-Image run); mu = 1 the frozen initial model, i.e.
the pretrained teacher (the code's LoRA runs: there the frozen base with adapters disabled, which fewstep's lora
mode hands every method as ``Parts.teacher``), and RCGM then reads the online student. So the paper is teacher-free
in its full runs (targets from data and an EMA of itself), and its LoRA runs read the frozen base, no second copy.

Negative time in a diffusers backbone. fewstep's backbones see the teacher's own process time in [0, 1] (VP
conversions, rounding, range checks), so the backbone gets |t|, and the sign enters as a second zero-initialised
embedding ``n(|t|)`` (``FakeTimeEmbedding``: sinusoids, Linear-SiLU-Linear, last layer zero) added to the same time
embedding by the same forward-hook mechanism as ``two_time``, on fake-branch samples only. The official code feeds
the signed t to its network's own sinusoids instead. Here the fake trajectory starts equal to the real one (dv = 0,
no rectification signal until the adv group has fitted the fakes), as DMD initialises its fake score from the
teacher, rather than from an embedding of negative times the pretrained model never saw. It is a module of the
method, not of the diffusers model: the exported student never runs at negative time and stays plain diffusers.

Sampling and export: ``TwinFlowStudent`` is ``core.flow_map.MeanFlowStudent``: the any-step sampler
``x_r = x_t - (t - r) F`` (the code's "any" sampling style; its "few" style, jumping to 0 and re-noising, is not
exported) and MeanFlow's two exports, ``flow_map`` (one plain backbone plus the offset embedding, every step count
up to ``export_steps``) and ``folded`` (one plain expert per trained step). A LoRA student's exports start from a
float32 copy of the in-memory base with the adapter merged in (a bf16 base rounds it, unlike ``export.fused``'s
re-read of the teacher from disk).

Sources. The abstract, project page and a paper-notes summary (t in [-1, 1], twin trajectories, dv rectification,
no auxiliary models). Everything else above is from the official code, read for understanding only
(inclusionAI/TwinFlow ``src/methodes/twinflow/twinflow.py`` at f5b12c4, Apache-2.0): the groups and their times
(gap 0.05), RCGM's target (delta 0.01, clip 1), enhanced target and range, Barron loss (alpha 1, c 1e-3), weighting,
rectification (weight 0.5, clip 1), EMA ramp. The run hyperparameters (SD3.5-M full: lr 1e-5, batch 16, gamma 0.8,
EMA 0.99, order 2; Qwen-Image LoRA r64: lr 1e-4, batch 4, gamma 4.0, EMA 1.0, order 1; AdamW (0.9, 0.99), clip 1)
are the code's configs' values as the project's method notes summarise them (the configs were not in the stored
copy of the repository). The paper's lambda ~ 1/3 between
base and TwinFlow losses could not be checked; the code's 0.5 is used. Left out: image-free training, t ~ Beta(a, b).

Config fields -> symbols: ``guidance_gamma`` = gamma (enhanced_ratio), ``guidance_t_min/max`` = enhanced_range,
``ema_decay`` = mu, ``estimate_order`` = N, ``frac_*`` = the group proportions, ``mul_gap`` = 0.05,
``rcgm_delta`` = delta, ``clip`` = both clips, ``rect_weight`` = dist_match_cof, ``barron_alpha/c`` = alpha, c;
``export`` / ``export_steps``: MeanFlow's (above). Real samples for x_t; no GAN head.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.adapter import adapter_for
from fewstep.core.conditioning import Batch, Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.flow_map import EXPORT_STEPS, EXPORTS, MAX_STEPS, MeanFlowStudent, check_foldable
from fewstep.core.flow_time import FlowTime, velocity_of
from fewstep.core.generator import FewStepGenerator
from fewstep.core.jvp import continuous
from fewstep.core.schedules import bcast
from fewstep.core.two_time import TimeOffsetEmbedding, attach, embedding_of
from fewstep.errors import ConfigError
from fewstep.methods.base import Method, Parts, Turn, has_real_images, require

GROUPS = ("e2e", "mul", "any", "adv")
SALT = 60           # the batch-seed salts of TwinFlow's draws


@dataclass
class TwinFlowConfig:
    """TwinFlow hyperparameters (see the module docstring for the paper symbols)."""

    guidance_gamma: float = 0.8
    guidance_t_min: float = 0.0
    guidance_t_max: float = 1.0
    ema_decay: float = 0.99
    estimate_order: int = 2
    frac_e2e: float = 0.25
    frac_mul: float = 0.25
    frac_any: float = 0.25
    frac_adv: float = 0.25
    mul_gap: float = 0.05
    rcgm_delta: float = 0.01
    clip: float = 1.0
    rect_weight: float = 0.5
    barron_alpha: float = 1.0
    barron_c: float = 1e-3
    export: str = "flow_map"
    export_steps: int = EXPORT_STEPS


class FakeTimeEmbedding(TimeOffsetEmbedding):
    """``n(|t|)`` on the fake (negative) half of the time axis only, zero-initialised. ``delta`` holds the signed t of
    the call in flight, which the inherited forward hook adds as ``self(delta)``."""

    def forward(self, t: Tensor) -> Tensor:
        n = self.linear_2(self.act(self.linear_1(self.sinusoids(t.abs()).to(self.linear_1.weight.dtype))))
        return n * torch.signbit(t).to(n.dtype)[:, None]     # -0.0 counts as the fake branch


@contextmanager
def signed_time(embedding: FakeTimeEmbedding, t: Tensor):
    """Backbone calls inside the block see the signed times ``t`` (per sample) through ``embedding``."""
    previous, embedding.delta = embedding.delta, t.float()
    try:
        yield
    finally:
        embedding.delta = previous


def barron(pred: Tensor, target: Tensor, alpha: float, c: float) -> Tensor:
    """Per-sample Barron-reweighted l2: ``mse sg(w) / c``, ``w = (mse / c^2 / |alpha - 2| + 1)^((alpha - 2) / 2)``."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if abs(alpha - 2) < 1e-5:
        return mse / c
    return mse * (mse.detach() / c ** 2 / abs(alpha - 2) + 1).pow((alpha - 2) / 2) / c


def group_sizes(B: int, cfg: TwinFlowConfig) -> list[int]:
    """Samples per group (e2e, mul, any, adv) of a batch of B, rounded as the official code (the last takes the
    rest)."""
    fr = [getattr(cfg, f"frac_{g}") for g in GROUPS]
    n = [round(B * f / sum(fr)) for f in fr[:-1]]
    return n + [B - sum(n)]


def draw_times(u_t: Tensor, u_r: Tensor, sizes: list[int], cfg: TwinFlowConfig) -> tuple[Tensor, Tensor]:
    """``(t, r)`` per sample (magnitudes; the adv group's are on the negative half) from two U[0, 1) draws."""
    t, r = u_t.clone(), u_t.clone()
    e2e, mul, any_ = (slice(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(3))
    t[e2e], r[e2e] = 1.0, 0.0
    r[mul] = t[mul] * (1 - cfg.mul_gap * u_r[mul])
    r[any_] = t[any_] * (1 - u_r[any_])
    return t, r


def ema_ramp(n: int, mu: float, cache: list[float]) -> float:
    """The code's EMA decay of update n: ``c_0 = 0``, ``c_{k+1} = c_k + (1 - c_k)(mu - c_k) / 2`` (``cache`` grows)."""
    while len(cache) <= n:
        c = cache[-1] if cache else None
        cache.append(0.0 if c is None else c + (1 - c) * (mu - c) / 2)
    return cache[n]


class TwinFlowStudent(MeanFlowStudent):
    """MeanFlow's student and its two exports; a LoRA student's exports copy the shared base in float32 with the
    adapter merged in (peft's own merge) and the two-time embedding that sits on that base."""

    def merged(self) -> Denoiser:
        d = self.denoiser
        if not isinstance(d.adapter, str):
            return d
        from peft.tuners.tuners_utils import BaseTunerLayer  # here, not at import: peft takes seconds to import

        model = copy.deepcopy(d.backbone.model).float()
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]:
            layer.merge(adapter_names=[d.adapter])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.get_base_layer())
        return Denoiser(adapter_for(model, d.prediction_type), d.schedule)


class TwinFlow(Method):
    """TwinFlow with one ``Turn("student")``; the EMA target moves in ``after_step``."""

    name = "twinflow"
    Config = TwinFlowConfig
    turns = (Turn("student"),)

    @classmethod
    def build(cls, cfg: TwinFlowConfig, parts: Parts) -> TwinFlow:
        return cls(cfg, parts.teacher, parts.student())

    @classmethod
    def validate(cls, cfg: TwinFlowConfig, model, data) -> None:
        require(cfg.guidance_gamma >= 0, f"method.guidance_gamma {cfg.guidance_gamma} must be >= 0 (target += gamma "
                "(v_c - v_u); 0 = no training-time CFG)")
        require(0 <= cfg.guidance_t_min < cfg.guidance_t_max <= 1, f"method.guidance_t_min {cfg.guidance_t_min} / "
                f"method.guidance_t_max {cfg.guidance_t_max}: need 0 <= guidance_t_min < guidance_t_max <= 1")
        require(0 <= cfg.ema_decay <= 1, f"method.ema_decay {cfg.ema_decay} must be in [0, 1] (0: the student "
                "itself, 1: the frozen initial model)")
        require(cfg.estimate_order >= 1, f"method.estimate_order {cfg.estimate_order} must be at least 1 (RCGM's N)")
        fr = [getattr(cfg, f"frac_{g}") for g in GROUPS]
        require(min(fr) >= 0 and sum(fr) > 0, f"method.frac_* {fr}: the group fractions must be >= 0, not all 0")
        sizes = group_sizes(data.batch_size, cfg)
        require(all((n > 0) == (f > 0) for n, f in zip(sizes, fr)), f"data.batch_size {data.batch_size} splits into "
                f"groups {dict(zip(GROUPS, sizes))} for fractions {fr}; raise data.batch_size (4 for four groups)")
        require(0 < cfg.mul_gap <= 1, f"method.mul_gap {cfg.mul_gap} must be in (0, 1] (r = t - u gap t)")
        require(0 < cfg.rcgm_delta < 1, f"method.rcgm_delta {cfg.rcgm_delta} must be in (0, 1)")
        require(cfg.clip > 0, f"method.clip {cfg.clip} must be > 0")
        require(cfg.rect_weight >= 0, f"method.rect_weight {cfg.rect_weight} must be >= 0")
        require(cfg.barron_c > 0, f"method.barron_c {cfg.barron_c} must be > 0")
        require(model.mode == "full" or cfg.ema_decay in (0.0, 1.0), f"model.mode lora with method.ema_decay "
                f"{cfg.ema_decay}: an EMA would copy the shared base; set method.ema_decay 1 (the frozen base, as the "
                "paper's LoRA runs) or 0 (the student itself)")
        require(not model.gan_head, "model.gan_head true: TwinFlow has no discriminator; set model.gan_head false")
        require(cfg.export in EXPORTS, f"method.export {cfg.export!r} is not known; use {' or '.join(EXPORTS)}")
        require(cfg.export_steps >= 1, f"method.export_steps {cfg.export_steps} must be at least 1")
        require(cfg.export != "folded" or 1 <= len(model.student_timesteps) <= MAX_STEPS, f"model.student_timesteps "
                f"{list(model.student_timesteps)}: the folded export has one expert per step; use 1 to {MAX_STEPS} "
                "steps, or method.export flow_map")
        require(has_real_images(data), f"TwinFlow builds x_t from real samples and data.source {data.source!r} has "
                "none; set data.images to a folder of real images (captions in <name>.txt), data.source images")

    def __init__(self, cfg: TwinFlowConfig, teacher: Denoiser, student: FewStepGenerator):
        super().__init__()
        self.cfg, self.teacher = cfg, teacher.requires_grad_(False)
        self.ft = FlowTime(teacher.schedule, teacher.prediction_type)
        top = float(teacher.schedule.timestep(torch.tensor(1.0)))
        first = float(student.denoiser.schedule.timestep(student.t_list[:1].cpu())[0])
        if abs(first - top) > 1e-3:
            raise ConfigError(f"model.student_timesteps starts at {first:g}: a TwinFlow student maps the noise at "
                              f"t = 1; start the list at {top:g}")
        backbone = student.denoiser.backbone
        attach(backbone)
        if cfg.export == "folded":
            check_foldable(backbone)
        self.student = TwinFlowStudent(student.denoiser, student.t_list, self.ft, cfg.export, cfg.export_steps)
        self.ema = None
        if 0 < cfg.ema_decay < 1:       # before the fake-time hook: the copy never runs at negative time
            self.ema = copy.deepcopy(student.denoiser).requires_grad_(False)
        module = backbone.model.get_submodule(backbone.time_embedding)
        self.fake = FakeTimeEmbedding(module.linear_2.out_features).to(module.linear_2.weight.device)
        module.register_forward_hook(self.fake.hook)
        self._ramp: list[float] = []

    def trainable(self):
        d = self.student.denoiser
        # lora: the two-time embedding sits on the shared base, beside the adapter (full: it is in the copy)
        offset = list(embedding_of(d.backbone.model).parameters()) if isinstance(d.adapter, str) else []
        return {"student": d.trainable_parameters() + offset + list(self.fake.parameters())}

    def checkpoint_modules(self):
        mods = {"student": self.student, "fake_time": self.fake}
        return mods | ({"target": self.ema} if self.ema is not None else {})

    def target_net(self) -> Denoiser:
        """The EMA copy, else the online student (read without gradient)."""
        return self.ema if self.ema is not None else self.student.denoiser

    def velocity(self, d: Denoiser, z: Tensor, t: Tensor, cond: Cond, r: Tensor | None = None,
                 fake: Tensor | None = None) -> Tensor:
        """``F(z_t, t, r)`` of d at flow times (``fake``: samples on the negative half, student only), float64."""
        if fake is None:
            return velocity_of(continuous(d), self.ft, z, t, cond, r)
        with signed_time(self.fake, torch.where(fake, -t, t)):
            return velocity_of(continuous(d), self.ft, z, t, cond, r)

    def one_step(self, e: Tensor, cond: Cond) -> Tensor:
        """The online student's one-step output ``z - hi F(z, hi, 0)`` from unit noise (no gradient)."""
        hi = torch.full((len(e),), self.ft.hi, device=e.device)
        z = e.double() / bcast(self.ft.scale(hi), e.double())
        return (z - bcast(hi, z) * self.velocity(self.student.denoiser, z, hi, cond, torch.zeros_like(hi))).to(e.dtype)

    def rcgm_target(self, net: Denoiser, F: Tensor, v: Tensor, z: Tensor, t: Tensor, r: Tensor, cond: Cond):
        """``sg(F - clip(R))`` of RCGM's N-th order estimate by ``net`` (module docstring)."""
        c = self.cfg
        t_m = torch.maximum(t - c.rcgm_delta, r)
        x = z - c.rcgm_delta * v
        start, N = x, c.estimate_order
        for i in range(N):
            t_c, t_n = t_m + (r - t_m) * i / N, t_m + (r - t_m) * (i + 1) / N
            x = x - bcast(t_c - t_n, x) * self.velocity(net, x, t_c, cond, t_n)
        gap = bcast(t - r, F)
        R = torch.where(gap >= c.rcgm_delta, (gap * F - (start - x)) / c.rcgm_delta - v, F - v)
        return F - R.clamp(-c.clip, c.clip)

    def loss_terms(self, x: Tensor, e: Tensor, t: Tensor, r: Tensor, sizes: list[int], e_fake: Tensor,
                   t_rect: Tensor, e_rect: Tensor, cond: Cond, uncond: Cond):
        """The loss at given data, noise and times (``t``, ``r`` magnitudes; the adv group last): ``(loss, logs)``."""
        c, (lo, hi), B = self.cfg, (self.ft.lo, self.ft.hi), len(x)
        n_e2e, n_adv = sizes[0], sizes[3]
        adv = torch.arange(B, device=x.device) >= B - n_adv
        enhance = ~adv & (t > c.guidance_t_min) & (t < c.guidance_t_max)     # the drawn t: e2e's is 1
        t = t.clamp(lo, hi)
        r = torch.where(adv, t, torch.minimum(r, t))
        x = x.clone()
        with torch.no_grad():
            if n_adv:
                x[adv] = self.one_step(e_fake[adv], cond[adv])
        z = (bcast(1 - t, x) * x + bcast(t, x) * e).double()
        v = (e - x).double()
        F = self.velocity(self.student.denoiser, z, t, cond, r, adv)
        with torch.no_grad():
            target = v.clone()
            if c.guidance_gamma and enhance.any():
                net = self.teacher if c.ema_decay == 1 else self.target_net()
                m = enhance
                v_c, v_u = self.velocity(net, torch.cat([z[m], z[m]]), torch.cat([t[m], t[m]]),
                                         Cond.cat(cond[m], uncond[m])).chunk(2)
                target[m] = (v_u if c.ema_decay == 1 else target[m]) + c.guidance_gamma * (v_c - v_u)
            real = ~adv
            if real.any():
                target[real] = self.rcgm_target(self.target_net(), F.detach()[real], target[real], z[real], t[real],
                                                r[real], cond[real])
        w = torch.where(adv, torch.ones_like(t), torch.tan((1 - (t - r)) * math.pi / 2.5) + 1)
        base = (w * barron(F, target, c.barron_alpha, c.barron_c)).mean()
        loss, logs = base, {"twinflow/base": base.detach()}
        if n_e2e and c.rect_weight:
            F_g = F[:n_e2e]
            with torch.no_grad():
                x_f = (z[:n_e2e] - bcast(t[:n_e2e], z) * F_g).float()
                s = t_rect[:n_e2e].clamp(lo, hi)
                z_f = (bcast(1 - s, x_f) * x_f + bcast(s, x_f) * e_rect[:n_e2e]).double()
                both = torch.cat([torch.ones_like(s, dtype=torch.bool), torch.zeros_like(s, dtype=torch.bool)])
                v_fake, v_real = self.velocity(self.student.denoiser, torch.cat([z_f, z_f]), torch.cat([s, s]),
                                               Cond.cat(cond[:n_e2e], cond[:n_e2e]), fake=both).chunk(2)
                dv = (v_fake - v_real).clamp(-c.clip, c.clip)
            rect = barron(F_g, F_g.detach() - dv, c.barron_alpha, c.barron_c).mean()
            loss = loss + c.rect_weight * rect
            logs |= {"twinflow/rectify": rect.detach(), "twinflow/delta_v": dv.abs().mean().float()}
        return loss, {"loss/student/twinflow": loss.detach(), **logs}

    def forward(self, turn: str, batch: Batch, step: int):
        if turn != "student":
            raise ValueError(f"TwinFlow has one turn, 'student', not {turn!r}")
        x = batch.x0_real.float()
        cond = batch.cond_real if batch.cond_real is not None else batch.cond
        sizes = group_sizes(len(x), self.cfg)
        t, r = draw_times(batch.rand(SALT, x.device), batch.rand(SALT + 1, x.device), sizes, self.cfg)
        return self.loss_terms(x, batch.randn_like(x, SALT + 2), t, r, sizes, batch.randn_like(x, SALT + 3),
                               batch.rand(SALT + 4, x.device), batch.randn_like(x, SALT + 5), cond, batch.uncond)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA target update with the code's decay ramp (update 0, a copy, is the initialisation)."""
        if self.ema is not None:
            d = ema_ramp(step + 1, self.cfg.ema_decay, self._ramp)
            for p_tgt, p in zip(self.ema.parameters(), self.student.denoiser.parameters()):
                p_tgt.lerp_(p.detach().to(p_tgt.dtype), 1 - d)
