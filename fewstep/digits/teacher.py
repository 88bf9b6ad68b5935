"""Train and sample the bundled class-conditional digits teacher.

Denoising diffusion (Ho et al. 2020, arXiv 2006.11239) on a VP process with the cosine schedule
(Nichol & Dhariwal 2021, arXiv 2102.09672), v-prediction (Salimans & Ho 2022, arXiv 2202.00512):
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0,
loss = ||v_theta(x_t, t, c) - v||^2 with t ~ U{0..999}. Labels are replaced by the null class with
probability p_uncond so one network gives both terms of classifier-free guidance (Ho & Salimans 2022,
arXiv 2207.12598), used as uncond + w (cond - uncond). Sampling is DDIM with eta = 0 (Song et al. 2020,
arXiv 2010.02502). The weights kept are an exponential moving average of the trained weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from fewstep.core.ema import EMA
from fewstep.digits import DIGITS_TEACHER
from fewstep.digits.data import NULL_CLASS, NUM_CLASSES, random_shift
from fewstep.digits.metrics import class_accuracy, fd_digits, load_digits_net

TEACHER_DIR = DIGITS_TEACHER

# layers_per_block=1 lands at 0.70M parameters; 2 gives 1.0M at 1.5x the step time on one CPU core
UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=32, num_class_embeds=NUM_CLASSES + 1,
)


@dataclass
class TeacherConfig:
    steps: int = 1600
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    max_shift: int = 0  # >0 shifts digits; off because 1-px shifts alone move FD-digits far above its floor
    seed: int = 0


def make_unet() -> UNet2DModel:
    return UNet2DModel(**UNET_CONFIG)


def make_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def make_sample_scheduler(train_scheduler: DDPMScheduler) -> DDIMScheduler:
    """DDIM with the training betas; trailing spacing so 1 step starts at t=999 (pure noise), not t=0."""
    return DDIMScheduler.from_config(
        train_scheduler.config, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
        timestep_spacing="trailing", steps_offset=0)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def v_loss(unet, scheduler: DDPMScheduler, x0, labels, p_uncond: float, generator) -> torch.Tensor:
    """One v-prediction denoising loss on a batch, with label dropout to the null class."""
    b = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    drop = torch.rand(b, generator=generator) < p_uncond
    labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
    x_t = scheduler.add_noise(x0, eps, t)
    target = scheduler.get_velocity(x0, eps, t)
    return F.mse_loss(unet(x_t, t, class_labels=labels).sample, target)


def fit(unet: torch.nn.Module, cfg, batch_loss, log_every: int = 100):
    """The bundled teachers' optimisation loop: AdamW (``cfg.lr``, ``cfg.weight_decay`` if any), linear warmup
    then cosine decay, gradient-norm clip 1, EMA (``cfg.ema_decay``) of the weights. ``batch_loss(step)``
    draws a batch and returns its loss. Returns (EMA model, history of (step, mean loss))."""
    # the teacher scripts count updates from 1 (decay min(d, (1+n)/(10+n)) at the n-th): start at 1
    ema = EMA(unet.parameters(), cfg.ema_decay, num_updates=1)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=getattr(cfg, "weight_decay", 0.0))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps))
    history, running = [], 0.0
    unet.train()
    for step in range(cfg.steps):
        loss = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.update()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            n = (step % log_every) + 1
            history.append((step + 1, running / n))
            print(f"step {step + 1:5d}  loss/teacher/v_mse {running / n:.4f}  lr {lr_sched.get_last_lr()[0]:.2e}",
                  flush=True)
            running = 0.0
    averaged = copy.deepcopy(unet).eval().requires_grad_(False)
    ema.copy_to(averaged.parameters())
    return averaged, history


def train_teacher(x0_all, labels_all, cfg: TeacherConfig, log_every: int = 100):
    """Train the teacher; returns (ema_unet, ddpm_scheduler, history of (step, loss))."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    unet, scheduler = make_unet(), make_train_scheduler()

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x0_all), (cfg.batch_size,), generator=g)
        x0 = random_shift(x0_all[idx], cfg.max_shift, generator=g)
        return v_loss(unet, scheduler, x0, labels_all[idx], cfg.p_uncond, g)

    ema_unet, history = fit(unet, cfg, batch_loss, log_every)
    return ema_unet, scheduler, history


@torch.no_grad()
def ddim_cfg(unet, scheduler, noise: torch.Tensor, cond: dict, null: dict, steps: int = 50, w: float = 2.0,
             batch_size: int = 500) -> torch.Tensor:
    """DDIM (eta 0, the scheduler's trailing spacing) from ``noise`` with CFG ``uncond + w (cond - uncond)`` in
    v-space: the bundled teachers' reference sampler. ``cond`` / ``null``: the UNet's conditioning keywords
    (``class_labels`` or ``encoder_hidden_states``), one entry per sample."""
    scheduler = DDIMScheduler.from_config(scheduler.config)  # own copy: set_timesteps mutates state
    scheduler.set_timesteps(steps)
    out = []
    for i in range(0, len(noise), batch_size):
        x_t = noise[i: i + batch_size]
        c = {k: v[i: i + batch_size] for k, v in cond.items()}
        both = {k: torch.cat([v, null[k][i: i + batch_size]]) for k, v in c.items()}
        for t in scheduler.timesteps:
            if w == 1.0:
                v = unet(x_t, t, **c).sample
            else:
                v_cond, v_uncond = unet(torch.cat([x_t, x_t]), t, **both).sample.chunk(2)
                v = v_uncond + w * (v_cond - v_uncond)
            x_t = scheduler.step(v, t, x_t, eta=0.0).prev_sample
        out.append(x_t)
    return torch.cat(out)


def sample_teacher(unet, scheduler: DDIMScheduler, labels: torch.Tensor, steps: int = 50, w: float = 2.0,
                   generator: torch.Generator | None = None, batch_size: int = 500) -> torch.Tensor:
    """DDIM (eta 0) samples ``[B, 1, 16, 16]`` of the class teacher for ``labels`` (``ddim_cfg``)."""
    size, ch = unet.config.sample_size, unet.config.in_channels
    noise = torch.randn((len(labels), ch, size, size), generator=generator)
    return ddim_cfg(unet, scheduler, noise, {"class_labels": labels},
                    {"class_labels": torch.full_like(labels, NULL_CLASS)}, steps, w, batch_size)


def evaluate_teacher(unet, scheduler, num_samples: int = 1000, seed: int = 0) -> dict:
    """Class accuracy and FD-digits (vs all real digits) of balanced samples at 50 steps w=2 and 1 step w=2."""
    net, labels, out = load_digits_net(), torch.arange(num_samples) % NUM_CLASSES, {"num_samples": num_samples}
    for steps in (50, 1):
        x = sample_teacher(unet, scheduler, labels, steps=steps, w=2.0, generator=torch.Generator().manual_seed(seed))
        out[f"acc_{steps}"], out[f"fd_{steps}"] = class_accuracy(x, labels, net), fd_digits(x, net)
    return out


CARD = """# digits_teacher: the fewstep bundled class-conditional pixel teacher

A diffusers `UNet2DModel` ({params:,} parameters) trained by `fewstep.teacher_training` on scikit-learn's
1,797 handwritten digits upsampled to 16x16 in [-1, 1] (`fewstep.digits.load_digits(16)`). Class labels
0-9; label 10 is the null (unconditional) label for classifier-free guidance (10% label dropout in training).

- Command: `{command}`
- Seed {seed}; {steps} steps of batch {batch_size}; AdamW lr {lr} ({warmup} warmup steps, cosine decay);
  grad-norm clip 1.0; random shifts up to {max_shift} px; the saved weights are an EMA with decay
  min({ema_decay}, (1+n)/(10+n)) at update n
- Objective: v-prediction MSE, `DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")`,
  integer t uniform in [0, 1000)
- Final loss (mean of the last {log_every} steps): {final_loss:.4f}
- Wall time: {wall:.0f} s on one CPU thread; torch {torch}; diffusers {diffusers}; date {date}

## Recommended sampling

50 DDIM steps (eta 0, the saved `scheduler/`: trailing spacing, v-prediction) with CFG w = 2 in the
convention `uncond + w * (cond - uncond)` (w = 1 is no guidance), unconditional label 10.
`fewstep.teacher_training.sample_teacher(unet, scheduler, labels, steps=50, w=2.0)` does exactly this.

## Evaluation ({num_samples} samples, {per_class} per class, seed {seed}; DigitsNet from `fewstep/assets/digits_net`)

| sampler | class accuracy | FD-digits vs all 1,797 real digits |
|---|---|---|
| DDIM 50 steps, w=2 | {acc_50:.4f} | {fd_50:.2f} |
| DDIM 1 step, w=2 | {acc_1:.4f} | {fd_1:.2f} |
| real vs real (two halves of 898, mean of 5 splits) | - | {floor:.2f} |

FD-digits is a Frechet distance in DigitsNet feature space, not FID.
"""
