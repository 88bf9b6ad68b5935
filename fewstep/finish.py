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
    if cfg.data.source in ("prompts", "images"):
        from .data import prompt_source

        if teacher.pipe is None:
            from .encoders import FAMILIES

            raise ConfigError(f"--data.source {cfg.data.source} needs a text-to-image teacher: a diffusers folder "
                              f"whose model_index.json names one of {', '.join(sorted(FAMILIES))}; "
                              f"{str(teacher.path)!r} holds none (class teachers take --data.source digits)")
        return prompt_source(cfg.data, teacher.pipe, cfg.train.seed)
    raise ConfigError(f"--data.source {cfg.data.source!r} is not available; use digits, prompts or images")


def check_export(cfg: RunConfig, teacher, method) -> None:
    """Fail before training when the student cannot be written as the teacher's stock pipeline."""
    experts = len(getattr(method.student, "experts", [None]))
    if teacher.pipe is not None and experts > 1 and not (teacher.pipeline_class == "WanPipeline" and experts == 2):
        raise ConfigError(f"a student with {experts} experts cannot be exported as a stock {teacher.pipeline_class}; "
                          "only WanPipeline holds two (transformer, transformer_2): use --method.phases 1")


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


def _student_weights(method, ema, with_lora: bool):
    """The student's (EMA) weights as plain diffusers backbones, one per expert (a LoRA adapter fused in),
    and, when ``with_lora``, the adapter itself for ``save_lora_weights`` (None in full mode): diffusers'
    UNet key format for UNets, peft's for transformers (as diffusers' own training scripts save them)."""
    denoisers = getattr(method.student, "experts", [method.student.denoiser])
    adapter = denoisers[0].adapter
    with ema.swapped() if ema is not None else nullcontext():
        models = [lora.merged_copy(d.backbone.model, d.adapter) if isinstance(d.adapter, str)
                  else copy.deepcopy(d.backbone.model) for d in denoisers]
        lora_sd = None
        if with_lora and isinstance(adapter, str):
            model = denoisers[0].backbone.model
            state = lora.adapter_state_dict(model, adapter, convert=type(model).__name__.startswith("UNet"))
            lora_sd = {k: v.detach().float().cpu().clone() for k, v in state.items()}
    return [m.cpu().float().eval() for m in models], lora_sd


def export_scheduler(cfg: RunConfig, teacher, method):
    """The scheduler that reproduces the student's sampler in the exported pipeline."""
    from fewstep_pipelines import fewstep_scheduler_for, student_scheduler_for

    ts = list(cfg.model.student_timesteps)
    if hasattr(method, "export_scheduler"):     # methods whose sampler differs (e.g. consistency boundary scalings)
        return method.export_scheduler(teacher.scheduler_config, ts)
    if teacher.pipe is None:
        return fewstep_scheduler_for(teacher.scheduler_config, ts, init_noise_scale=method.student.init_scale)
    sched = student_scheduler_for(teacher.scheduler_config, ts, method.student.init_scale, teacher.pipeline_class)
    if teacher.pipeline_class == "IFPipeline" and "variance_type" in teacher.scheduler_config:
        # IFPipeline reads its UNet's output layout (prediction only, or + variance) from the scheduler config
        sched.register_to_config(variance_type=teacher.scheduler_config["variance_type"])
    return sched


def export_student(cfg: RunConfig, teacher, method, ema) -> Path:
    """Write the student (EMA weights) into the run folder as a diffusers pipeline with a model card: the
    teacher's own stock pipeline with the student swapped in for a text-to-image teacher (plus diffusers
    LoRA weights in lora mode), a FewStepClassPipeline for a class-conditional one."""
    out = Path(cfg.train.output_dir)
    models, lora_sd = _student_weights(method, ema, with_lora=teacher.pipe is not None)
    sched = export_scheduler(cfg, teacher, method)
    tmp = out / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if teacher.pipe is None:
        _save_class_pipeline(cfg, teacher, method, models, sched, tmp)
    else:
        _save_text_to_image(cfg, teacher, method, models, lora_sd, sched, tmp)
    for entry in tmp.iterdir():
        dest = out / entry.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    tmp.rmdir()
    return out


def _save_class_pipeline(cfg: RunConfig, teacher, method, unets, sched, tmp: Path) -> None:
    from fewstep_pipelines import FewStepClassPipeline, save_pipeline_dir

    # a phased student (Phased DMD) has one expert per phase; the pipeline switches them by timestep
    experts = {f"unet_{i}": u for i, u in enumerate(unets[1:], 1)}
    bounds = method.student.expert_boundaries() if experts else None
    pipe = FewStepClassPipeline(unet=unets[0], scheduler=sched, expert_boundaries=bounds, **experts)
    save_pipeline_dir(pipe, tmp, model_card=model_card(cfg, teacher))


def _save_text_to_image(cfg: RunConfig, teacher, method, models, lora_sd, sched, tmp: Path) -> None:
    from fewstep_pipelines import save_lora, save_student_pipeline

    check_export(cfg, teacher, method)
    swapped, updates = {teacher.folder: models[0]}, {}
    if len(models) == 2:        # Wan 2.2 layout: `transformer` at t >= boundary, `transformer_2` below
        ts, split = list(cfg.model.student_timesteps), method.student.phase_of_step
        i = split.index(1)
        T = teacher.scheduler_config.get("num_train_timesteps", 1000)
        swapped["transformer_2"] = models[1]
        updates["boundary_ratio"] = (ts[i - 1] + ts[i]) / 2 / T
    save_student_pipeline(teacher.path, tmp, swapped, sched, config_updates=updates)
    has_lora = lora_sd is not None and save_lora(type(teacher.pipe), tmp, teacher.folder, lora_sd, cfg.model.lora_rank,
                                                 method.student.denoiser.backbone.lora_targets)
    (tmp / "README.md").write_text(t2i_model_card(cfg, teacher, sched, has_lora))


def _call_args(cfg: RunConfig, teacher) -> str:
    """The keyword arguments of the exported pipeline's call that reproduce the training-time sampler."""
    from .encoders import _backbone, _call_default

    K = len(cfg.model.student_timesteps)
    args = [f"num_inference_steps={K}"]
    if getattr(_backbone(teacher.pipe).config, "guidance_embeds", False):    # Flux-dev, Sana-Sprint
        args.append(f"guidance_scale={_call_default(teacher.pipe, 'guidance_scale')}")
    else:
        args.append("guidance_scale=1.0")
    if teacher.pipeline_class == "IFPipeline":     # prompts were encoded without IF's optional caption cleaning
        args.append("clean_caption=False")
    d = cfg.data
    if d.resolution:
        args += [f"height={d.resolution}", f"width={d.resolution}"]
    if d.num_frames:
        args.append(f"num_frames={d.num_frames}")
    return ", ".join(args)


def t2i_model_card(cfg: RunConfig, teacher, sched, has_lora: bool) -> str:
    """README.md of a text-to-image student: what it is and how to load it (full pipeline or LoRA)."""
    ts, K = list(cfg.model.student_timesteps), len(cfg.model.student_timesteps)
    pipe_cls, sched_cls = teacher.pipeline_class, type(sched).__name__
    custom = sched_cls == "FewStepScheduler"
    out, base = cfg.train.output_dir, cfg.model.teacher or str(teacher.path)
    example = "a handwritten seven" if cfg.model.teacher == "digits_t2i" else "a photo of a cat"
    trust = ", trust_remote_code=True" if custom else ""
    output = ".frames[0]" if pipe_cls == "WanPipeline" else ".images[0]"
    load_sched = (f'import sys\nsys.path.insert(0, "{out}/scheduler")  # its custom scheduler: no fewstep needed\n'
                  "from scheduling_fewstep import FewStepScheduler\n" if custom
                  else f"from diffusers import {sched_cls}\n")
    how = " (custom component: load with `trust_remote_code=True`)" if custom else " (stock diffusers)"
    w = getattr(cfg.method, "guidance_scale", "n/a")
    lora = f"""
## Load as a LoRA on the teacher

`pytorch_lora_weights.safetensors` holds the student's LoRA (rank {cfg.model.lora_rank}) in diffusers' format:

```python
from diffusers import {pipe_cls}
{load_sched}pipe = {pipe_cls}.from_pretrained("{base}")
pipe.load_lora_weights("{out}")
pipe.scheduler = {sched_cls}.from_pretrained("{out}", subfolder="scheduler")
result = pipe("{example}", {_call_args(cfg, teacher)}){output}
```
""" if has_lora else ""
    notes, scale = "", float(getattr(sched, "init_noise_sigma", 1.0))
    if scale != 1.0:
        notes = (f"- The student's input noise is scaled by {scale:.4g} (SiD). VP pipelines apply "
                 "the scheduler's `init_noise_sigma`; flow pipelines (SD3, Flux, Sana, Wan) do not: pass "
                 "`latents=init_noise_sigma * torch.randn(...)` there.\n")
    if pipe_cls == "IFPipeline" and sched.config.get("variance_type"):
        notes += (f"- `variance_type: {sched.config['variance_type']}` in the scheduler config is read by "
                  "IFPipeline only: it then takes the UNet output as it is instead of splitting off variance "
                  "channels (the scheduler ignores the key and says so when loading).\n")
    return f"""---
library_name: diffusers
base_model: {base}
pipeline_tag: {"text-to-video" if pipe_cls == "WanPipeline" else "text-to-image"}
tags: [fewstep, distillation, {cfg.method_name}]
---
# {cfg.method_name.upper()} student of `{base}`

Distilled with [fewstep](https://pypi.org/project/fewstep/) (method `{cfg.method_name}`, preset `{cfg.preset}`,
mode `{cfg.model.mode}`) in {cfg.train.max_steps} training steps. This folder is a stock `{pipe_cls}`: the teacher's
text encoders, tokenizers and VAE, the student's {teacher.folder} and a `{sched_cls}`{how}
that samples exactly as fewstep does: predict x0, then re-noise to the next timestep.

- Student steps: {K} (timesteps {ts}); fewer steps take an evenly strided subset of them.
- Guidance is distilled in: call it without classifier-free guidance (`guidance_scale=1.0`; guidance-embedded
  models keep the embedding value they were trained with).
- Real-score guidance during training: {w} (convention `uncond + w (cond - uncond)`).
{notes}- Full training config: `config.json`.

## Load the full student

```python
from diffusers import {pipe_cls}
pipe = {pipe_cls}.from_pretrained("{out}"{trust})
result = pipe("{example}", {_call_args(cfg, teacher)}){output}
```
{lora}"""


def teacher_reference(teacher_dir: Path, n: int, seeds=(0, 1, 2)) -> dict:
    """The teacher's own figures (50 DDIM steps, its CFG; and 1 step), cached beside the teacher."""
    from . import digits_eval

    cache = teacher_dir / "reference_metrics.json"     # {"<num_samples>": figures}, one entry per sample count
    table = json.loads(cache.read_text()) if cache.is_file() else {}
    ref = table.get(str(n))
    if ref is not None and ref.get("seeds") == list(seeds):
        return ref
    pipe = digits_eval.load_pipeline(teacher_dir)
    ref = digits_eval.score(pipe, n, seeds, steps=50, guidance_scale=2.0)
    one = digits_eval.score(pipe, n, seeds, steps=1, guidance_scale=2.0)
    ref.update({"steps": 50, "guidance_scale": 2.0, "one_step_fd_digits": one["fd_digits"],
                "one_step_accuracy": one["accuracy"]})
    try:
        cache.write_text(json.dumps({**table, str(n): ref}, indent=2))
    except OSError:
        pass   # read-only install: recomputed next time
    return ref


def write_metrics(cfg: RunConfig, result: dict) -> dict:
    """Score the exported student against the teacher and write ``metrics.json`` into the run folder."""
    from . import digits_eval
    from .build import teacher_path

    if cfg.data.source == "prompts" and cfg.model.teacher == "digits_t2i":
        return write_digits_t2i_metrics(cfg, result)
    if cfg.data.source != "digits":
        print("metrics.json is written for the digits teacher only; score text-to-image students with "
              "eval/fid.py and eval/clip_score.py")
        return {}
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
         "updates": result["updates"], "steps": result["step"], "train_seconds": result.get("train_seconds"),
         "eval_seconds": time.perf_counter() - t0,
         "note": "FD-digits is a Frechet distance in the bundled digits net's feature space, not FID."}
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    print(json.dumps({k: m[k] for k in ("fd_ratio_to_teacher", "fd_ratio_to_teacher_one_step", "speedup_images_per_s")}
                     | {"student_accuracy": s["accuracy"], "student_fd_digits": s["fd_digits"]}, indent=2))
    return m


def write_digits_t2i_metrics(cfg: RunConfig, result: dict) -> dict:
    """``metrics.json`` of a student of the bundled text-to-image digits teacher: prompt-following accuracy
    (the digits net's argmax equals the digit the prompt names) and FD-digits of the exported folder loaded
    with the stock ``IFPipeline``, on the training templates and on held-out ones, beside the teacher's own
    figures (50 DDIM steps at CFG 2, cached in the asset's ``reference_metrics.json``)."""
    from . import digits_t2i as D

    out, n, seeds = Path(cfg.train.output_dir), cfg.train.eval_samples, (cfg.train.seed,)
    K = len(cfg.model.student_timesteps)
    t0 = time.perf_counter()
    ref = D.teacher_reference(n, seeds)
    student = D.load_pipeline(out)
    t1 = time.perf_counter()
    s = D.score(student, n, seeds, K)
    s["seconds"] = time.perf_counter() - t1
    s["heldout"] = D.score(student, max(10, n // 2), seeds, K, templates=D.HELDOUT_TEMPLATES)
    m = {"student": {**s, "nfe": K}, "teacher": {**ref, "nfe": 2 * ref["steps"]},
         "accuracy_gap_to_teacher": ref["accuracy"] - s["accuracy"],
         "fd_ratio_to_teacher": s["fd_digits"] / ref["fd_digits"], "templates": list(D.TEMPLATES),
         "heldout_templates": list(D.HELDOUT_TEMPLATES), "updates": result["updates"], "steps": result["step"],
         "train_seconds": result.get("train_seconds"), "eval_seconds": time.perf_counter() - t0,
         "note": "accuracy: the bundled digits net's argmax equals the digit named in the prompt. FD-digits is a "
                 "Frechet distance in that net's feature space, not FID."}
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    print(json.dumps({"student_accuracy": s["accuracy"], "teacher_accuracy": ref["accuracy"],
                      "student_fd_digits": s["fd_digits"], "teacher_fd_digits": ref["fd_digits"],
                      "student_heldout_accuracy": s["heldout"]["accuracy"],
                      "teacher_heldout_accuracy": ref["heldout"]["accuracy"]}, indent=2))
    return m
