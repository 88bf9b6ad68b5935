"""Model cards (README.md of an exported run folder): what the student is and how to load it."""
from __future__ import annotations

from fewstep.backbones.encoders import _backbone, _call_default
from fewstep.run.config import RunConfig


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


def _call_args(cfg: RunConfig, teacher) -> str:
    """The keyword arguments of the exported pipeline's call that reproduce the training-time sampler."""
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


def _components(teacher) -> str:
    """What the exported folder keeps of the teacher, in words (a pixel-space pipeline has no VAE)."""
    parts = ["text encoders" if getattr(teacher.pipe, "text_encoder_2", None) is not None else "text encoder",
             "tokenizers" if getattr(teacher.pipe, "tokenizer_2", None) is not None else "tokenizer"]
    if getattr(teacher.pipe, "vae", None) is not None:
        parts.append("VAE")
    return ", ".join(parts[:-1]) + " and " + parts[-1]


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
{_components(teacher)}, the student's {teacher.folder} and a `{sched_cls}`{how}
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


EVALUATION_HEADING = "\n## Evaluation on digits"


def evaluation_section(m: dict) -> str:
    """The model card's evaluation section from a digits ``metrics.json``: the student beside the teacher at its
    best setting (the reference every ratio divides by), and the fixed CFG-2 setting labelled as such."""
    s, t, c = m["student"], m["teacher"], m["teacher_cfg2"]
    def num(r: dict, key: str, digits: int) -> str:
        return f"{r[key]:.{digits}f}" if r.get(key) is not None else "–"   # the fixed-setting row has FD only

    def row(name: str, r: dict) -> str:
        return (f"| {name} | {num(r, 'fd_digits', 2)} | {num(r, 'fd_digits_net2', 2)} | {num(r, 'accuracy', 3)} | "
                f"{num(r, 'precision', 3)} | {num(r, 'recall', 3)} | {r['nfe']} |")

    mem = m["memorisation"]
    return f"""{EVALUATION_HEADING} ({s['num_samples']} samples x {len(s['seeds'])} seeds)

Reference: {m['reference']}.

| model | FD-digits | FD-digits (net 2) | accuracy | precision | recall | NFE |
|---|---|---|---|---|---|---|
{row("student", s)}
{row(f"teacher at its best ({t['setting']})", t)}
{row(f"teacher at {c['setting']}", c)}

- FD ratio to the teacher at its best: {m['fd_ratio_to_teacher']:.2f} (net 2: {m['fd_ratio_to_teacher_net2']:.2f});
  recall ratio {m['recall_ratio_to_teacher']:.2f}. Against the fixed CFG-2 setting: {m['fd_ratio_to_teacher_cfg2']:.2f}.
- Memorisation: median distance to the nearest training digit {mem['student']['median']:.3f} (teacher
  {mem['teacher']['median']:.3f}); flagged as copying: {mem['copies']}.
- FD-digits is a Frechet distance in the bundled digits nets' feature space, not FID.
"""
