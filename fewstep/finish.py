"""What a training script does around the loop: the batch source, sample grids during training, the
diffusers export of the student and ``metrics.json``."""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import lora
from .config import ConfigError, RunConfig
from .conditioning import Cond
from .images import save_grid


def make_source(cfg: RunConfig, teacher):
    """The batch source a config asks for."""
    if cfg.data.source == "digits":
        from .data import digits_source

        model_cfg = teacher.denoiser.backbone.model.config
        if getattr(model_cfg, "num_class_embeds", None) is None:
            raise ConfigError("--data.source digits needs a class-conditional teacher (UNet2DModel with "
                              "num_class_embeds); use a prompt source for text-to-image teachers")
        return digits_source(cfg.data.batch_size, cfg.train.seed, model_cfg.sample_size)
    raise ConfigError(f"--data.source {cfg.data.source!r} is not available; use digits")


@torch.no_grad()
def sample_grid(cfg: RunConfig, method, source, ema, step: int) -> Path:
    """10 x 10 grid (one row per class) of the student's samples, EMA weights, fixed seed."""
    g = torch.Generator().manual_seed(1234)
    n = 100
    labels = torch.arange(n) % 10
    noise = torch.randn((n, *source.sample_shape), generator=g)
    device = next(method.parameters()).device
    with ema.swapped() if ema is not None else nullcontext():
        x = method.student.sample(noise.to(device), Cond(labels=labels.to(device)), generator=g)
    grid = x.reshape(10, 10, *x.shape[1:]).transpose(0, 1).reshape(n, *x.shape[1:])
    return save_grid(grid, Path(cfg.train.output_dir) / "samples" / f"step_{step:07d}.png")


def model_card(cfg: RunConfig, teacher) -> str:
    ts = list(cfg.model.student_timesteps)
    return f"""---
library_name: diffusers
tags: [fewstep, distillation, {cfg.method_name}]
---
# {cfg.method_name.upper()} student of `{teacher.path.name}`

Distilled with [fewstep](https://pypi.org/project/fewstep/) (method `{cfg.method_name}`, preset
`{cfg.preset}`) from the teacher at `{teacher.path}` in {cfg.train.max_steps} steps.

- Student steps: {len(ts)} (timesteps {ts}); guidance is distilled in, so call it with `guidance_scale=1`.
- Real-score guidance during training: {getattr(cfg.method, 'guidance_scale', 'n/a')} (convention `uncond + w (cond - uncond)`).
- Full training config: `config.json`; evaluation: `metrics.json`.

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{cfg.train.output_dir}", trust_remote_code=True)
images = pipe([0, 1, 2, 3], num_inference_steps={len(ts)}).images
```
"""


def export_student(cfg: RunConfig, teacher, method, ema) -> Path:
    """Write the student (EMA weights) into the run folder as a diffusers pipeline with a model card."""
    from fewstep_pipelines import FewStepClassPipeline, fewstep_scheduler_for, save_pipeline_dir

    out = Path(cfg.train.output_dir)
    # a phased student (Phased DMD) has one expert per phase; the pipeline switches them by timestep
    denoisers = getattr(method.student, "experts", [method.student.denoiser])
    with ema.swapped() if ema is not None else nullcontext():
        # lora mode: fuse the student adapter into a plain backbone
        unets = [lora.merged_copy(d.backbone.model, d.adapter).cpu().float() if isinstance(d.adapter, str)
                 else copy.deepcopy(d.backbone.model).cpu().float() for d in denoisers]
    ts = list(cfg.model.student_timesteps)
    if hasattr(method, "export_scheduler"):     # methods whose sampler differs (e.g. consistency boundary scalings)
        sched = method.export_scheduler(teacher.scheduler_config, ts)
    else:
        sched = fewstep_scheduler_for(teacher.scheduler_config, ts, init_noise_scale=method.student.init_scale)
    experts = {f"unet_{i}": u.eval() for i, u in enumerate(unets[1:], 1)}
    bounds = method.student.expert_boundaries() if experts else None
    pipe = FewStepClassPipeline(unet=unets[0].eval(), scheduler=sched, expert_boundaries=bounds, **experts)
    tmp = out / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline_dir(pipe, tmp, model_card=model_card(cfg, teacher))
    for entry in tmp.iterdir():
        dest = out / entry.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    tmp.rmdir()
    return out


def teacher_reference(teacher_dir: Path, n: int, seeds=(0, 1, 2)) -> dict:
    """The teacher's own figures (50 DDIM steps, its CFG; and 1 step), cached beside the teacher."""
    from . import digits_eval

    cache = teacher_dir / "reference_metrics.json"
    if cache.is_file():
        ref = json.loads(cache.read_text())
        if ref.get("num_samples") == n and ref.get("seeds") == list(seeds):
            return ref
    pipe = digits_eval.load_pipeline(teacher_dir)
    ref = digits_eval.score(pipe, n, seeds, steps=50, guidance_scale=2.0)
    one = digits_eval.score(pipe, n, seeds, steps=1, guidance_scale=2.0)
    ref.update({"steps": 50, "guidance_scale": 2.0, "one_step_fd_digits": one["fd_digits"],
                "one_step_accuracy": one["accuracy"]})
    try:
        cache.write_text(json.dumps(ref, indent=2))
    except OSError:
        pass   # read-only install: recomputed next time
    return ref


def write_metrics(cfg: RunConfig, result: dict) -> dict:
    """Score the exported student against the teacher and write ``metrics.json`` into the run folder."""
    from . import digits_eval
    from .build import teacher_path

    out = Path(cfg.train.output_dir)
    t0 = time.perf_counter()
    student = digits_eval.load_pipeline(out)
    teacher_dir = teacher_path(cfg.model.teacher)
    ref = teacher_reference(teacher_dir, cfg.train.eval_samples)
    s = digits_eval.score(student, cfg.train.eval_samples)
    speed_s = digits_eval.throughput(student)
    speed_t = digits_eval.throughput(digits_eval.load_pipeline(teacher_dir), steps=50, guidance_scale=2.0)
    m = {"student": {**s, **speed_s, "steps": len(cfg.model.student_timesteps), "nfe": len(cfg.model.student_timesteps)},
         "teacher": {**ref, **speed_t, "nfe": 100},
         "fd_ratio_to_teacher": s["fd_digits"] / ref["fd_digits"],
         "fd_ratio_to_teacher_one_step": s["fd_digits"] / ref["one_step_fd_digits"],
         "speedup_images_per_s": speed_s["images_per_s"] / speed_t["images_per_s"],
         "updates": result["updates"], "steps": result["step"], "eval_seconds": time.perf_counter() - t0,
         "note": "FD-digits is a Frechet distance in the bundled digits net's feature space, not FID."}
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    print(json.dumps({k: m[k] for k in ("fd_ratio_to_teacher", "fd_ratio_to_teacher_one_step", "speedup_images_per_s")}
                     | {"student_accuracy": s["accuracy"], "student_fd_digits": s["fd_digits"]}, indent=2))
    return m
