"""Sample grids written during training (EMA weights, fixed seeds)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from fewstep.core.conditioning import Cond
from fewstep.run.config import RunConfig
from fewstep.run.images import save_grid


@torch.no_grad()
def sample_grid(cfg: RunConfig, method, source, ema, step: int) -> Path:
    """10 x 10 grid (one row per class) of the student's samples, EMA weights, fixed seed; text-to-image:
    one row, the first prompts (first frame of videos), decoded by the teacher's VAE."""
    if hasattr(source, "preview"):
        return _prompt_grid(cfg, method, source, ema, step)
    g = torch.Generator().manual_seed(1234)
    n = 100
    labels = torch.arange(n) % 10
    noise = torch.randn((n, *source.sample_shape), generator=g)
    device = next(method.parameters()).device
    with ema.swapped() if ema is not None else nullcontext():
        x = method.student.sample(noise.to(device), Cond(labels=labels.to(device)), generator=g)
    grid = x.reshape(10, 10, *x.shape[1:]).transpose(0, 1).reshape(n, *x.shape[1:])
    return save_grid(grid, Path(cfg.train.output_dir) / "samples" / f"step_{step:07d}.png")


@torch.no_grad()
def _prompt_grid(cfg: RunConfig, method, source, ema, step: int) -> Path:
    prompts, cond = source.preview(4)
    device = next(method.parameters()).device
    noise = torch.randn((len(prompts), *source.sample_shape), generator=torch.Generator().manual_seed(1234))
    with ema.swapped() if ema is not None else nullcontext():
        z = method.student.sample(noise.to(device), cond.to(device),
                                  generator=torch.Generator(device).manual_seed(1234))
    x = source.codec.decode(z).float().cpu()
    x = x[:, :, 0] if x.ndim == 5 else x
    path = Path(cfg.train.output_dir) / "samples" / f"step_{step:07d}.png"
    path.with_suffix(".txt").parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")
    return save_grid(x, path, nrow=len(prompts), scale=1)
