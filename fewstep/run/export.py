"""The one export path: a trained student (a ``FewStepGenerator``) -> a diffusers folder in the run directory.

The student describes how it samples (``FewStepGenerator.sampling``); ``schedulers.scheduler_for`` turns that
description into a stock or bundled scheduler, and this module writes the teacher's stock pipeline with the
student's backbone(s) swapped in (text-to-image teachers, plus diffusers LoRA weights in lora mode), or a
``FewStepClassPipeline`` (class-conditional teachers; several experts switched by timestep). Nothing here
knows which method trained the student.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from fewstep_pipelines import FewStepClassPipeline
from fewstep_pipelines.experts_fewstep import FewStepExperts
from fewstep_pipelines.router_fewstep import FewStepRouter

from fewstep.backbones import lora
from fewstep.core.generator import FewStepGenerator
from fewstep.errors import ConfigError
from fewstep.run.cards import model_card, t2i_model_card
from fewstep.run.config import RunConfig
from fewstep.run.folders import save_lora, save_pipeline_dir, save_student_pipeline
from fewstep.run.schedulers import flow_map_scheduler_for, scheduler_for

# stock pipelines that hold two experts, and the component of the second (Wan 2.2: high / low noise)
TWO_EXPERT_PIPELINES = {"WanPipeline": "transformer_2"}


def scheduler(teacher, student: FewStepGenerator, flow_map=None):
    """The scheduler that reproduces the student's sampler in the exported pipeline; the teacher's own for a student
    that ``samples_as_teacher`` (a guidance-distilled teacher keeps the teacher's sampler and step count); a
    ``FewStepScheduler`` that carries ``flow_map`` (a flow-map student's offset embedding and (t, r) pairs)."""
    if flow_map is not None:
        return _exportable(lambda: flow_map_scheduler_for(student.sampling(), teacher.scheduler_config, flow_map))
    if getattr(student, "samples_as_teacher", False):
        import diffusers

        config = dict(teacher.scheduler_config)
        cls = getattr(diffusers, str(config.get("_class_name")), None)
        if cls is None:
            raise ConfigError(f"the teacher's scheduler {config.get('_class_name')!r} is not a diffusers scheduler "
                              "this export can write; use a teacher saved with a stock scheduler")
        return cls.from_config(config)
    return _exportable(lambda: scheduler_for(student.sampling(), teacher.scheduler_config, teacher.pipeline_class))


def _exportable(make):
    try:
        return make()
    except ValueError as e:
        raise ConfigError(f"model.student_timesteps: the student cannot be exported ({e})") from None


def check(teacher, student: FewStepGenerator) -> None:
    """Fail before training when the student cannot be written as a loadable pipeline (a flow-map student: its
    scheduler without the offset embedding, which training has yet to make)."""
    if getattr(student, "export_as", None) == "flow_map":
        _exportable(lambda: flow_map_scheduler_for(student.sampling(), teacher.scheduler_config))
    else:
        scheduler(teacher, student)


def fused(denoiser, teacher, rank: int) -> torch.nn.Module:
    """A plain copy of a LoRA role's backbone with its adapter merged into the teacher's own stored weights
    (re-read from disk in float32), so the fused student equals "teacher + LoRA file" loaded in diffusers; a
    bf16-stored base in training would otherwise round the merge."""
    model = denoiser.backbone.model
    base = type(model).from_pretrained(teacher.path, subfolder=teacher.folder, torch_dtype=torch.float32)
    lora.add_adapter(base, denoiser.adapter, rank, denoiser.backbone.lora_targets)
    src = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in base.named_parameters():
            if f".{denoiser.adapter}." in name:
                p.copy_(src[name].float())
    return lora.merged_copy(base, denoiser.adapter)


def plain_student(student: FewStepGenerator, ema):
    """``(student, ema, flow_map)`` to export. A student whose backbones are not plain diffusers models (a two-time
    flow-map student) makes plain ones under its EMA weights (the copies need no EMA afterwards): with ``flow_map()``
    when its ``export_as`` is "flow_map" (one plain backbone, and the offset embedding and (t, r) pairs the scheduler
    carries), else with ``plain()`` (folded per-step experts). Every other student is exported as it is."""
    how = getattr(student, "export_as", None) or ("plain" if callable(getattr(student, "plain", None)) else None)
    if how is None:
        return student, ema, None
    with ema.swapped() if ema is not None else nullcontext():
        if how == "flow_map":
            plain, flow_map = student.flow_map()
            return plain, None, flow_map
        return student.plain(), None, None


def student_backbones(student: FewStepGenerator, teacher, ema, rank: int) -> list[torch.nn.Module]:
    """The student's (EMA) weights as plain diffusers backbones in float32, one per expert."""
    with ema.swapped() if ema is not None else nullcontext():
        models = [plain_backbone(d, teacher, rank) for d in student.experts]
    return [m.cpu().float().eval() for m in models]


def plain_backbone(d, teacher, rank: int) -> torch.nn.Module:
    """One denoiser's backbone as a plain model: LoRA roles fused; a denoiser that routes each sample to the student
    owning its condition (MSD) as one ``FewStepRouter`` over its students' plain backbones and its rule."""
    if callable(getattr(d, "routing", None)):
        return FewStepRouter.of([plain_backbone(s, teacher, rank) for s in d.denoisers], **d.routing())
    return fused(d, teacher, rank) if isinstance(d.adapter, str) else copy.deepcopy(d.backbone.model)


def lora_weights(student: FewStepGenerator, ema) -> dict | None:
    """The student's (EMA) LoRA adapter for ``save_lora_weights`` (None in full mode): diffusers' UNet key
    format for UNets, peft's for transformers (as diffusers' own training scripts save them)."""
    d = student.denoiser
    if not isinstance(d.adapter, str):
        return None
    model = d.backbone.model
    with ema.swapped() if ema is not None else nullcontext():
        state = lora.adapter_state_dict(model, d.adapter, convert=type(model).__name__.startswith("UNet"))
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def export_student(cfg: RunConfig, teacher, student: FewStepGenerator, ema) -> Path:
    """Write the student (EMA weights) into the run folder as a diffusers pipeline with a model card."""
    out = Path(cfg.train.output_dir)
    student, ema, flow_map = plain_student(student, ema)
    if flow_map is None:
        check(teacher, student)
    models = student_backbones(student, teacher, ema, cfg.model.lora_rank)
    sched = scheduler(teacher, student, flow_map)
    tmp = out / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if teacher.pipe is None:
        experts = {f"unet_{i}": u for i, u in enumerate(models[1:], 1)}
        pipe = FewStepClassPipeline(unet=models[0], scheduler=sched, **experts,
                                    expert_boundaries=student.expert_boundaries() if experts else None)
        save_pipeline_dir(pipe, tmp, model_card=model_card(cfg, teacher))
        folders = ["unet", *experts]
    else:
        folders = _save_text_to_image(cfg, teacher, student, models, lora_weights(student, ema), sched, tmp)
    if callable(getattr(student, "model_card", None)):     # a student that is no few-step sampler describes itself
        (tmp / "README.md").write_text(student.model_card(cfg, teacher, tmp))
    # the run folder also reloads as a FewStepGenerator (FewStepGenerator.from_pretrained), without a preset
    config = student.save_config(tmp, folders)
    if flow_map is not None:
        mark_flow_map(config, flow_map)
    for entry in tmp.iterdir():
        dest = out / entry.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    tmp.rmdir()
    return out


def mark_flow_map(path: Path, flow_map) -> None:
    """Name a flow-map export's sampler in its ``generator_config.json``: the plain backbone it lists is the student
    at r = t only, and samples as the flow map with the (t, r) pairs and offset embedding of the scheduler folder."""
    config = json.loads(path.read_text())
    config["_class_name"] = "MeanFlowStudent"
    config["flow_map"] = {"time_embedding": flow_map.time_embedding, "offset": "scheduler/time_offset",
                          "timesteps": flow_map.timesteps, "pairs": flow_map.pairs}
    path.write_text(json.dumps(config, indent=2) + "\n")


def boundaries(student: FewStepGenerator) -> list[float]:
    """Where each later expert takes over, in scheduler timesteps: midway between its phase's first step and the
    step before it (a listed timestep itself would fall on either side of a float comparison)."""
    spec = student.sampling()
    first = [list(spec.phase_of_step).index(p) for p in range(1, spec.experts)]
    return [(spec.timesteps[i - 1] + spec.timesteps[i]) / 2 for i in first]


def expert_switch(student: FewStepGenerator, models) -> FewStepExperts:
    """One component holding every expert, switched by the timestep the pipeline passes its backbone."""
    adapter = student.denoiser.backbone
    switch = FewStepExperts(expert_class=type(models[0]).__name__, expert_config=dict(models[0].config),
                            num_experts=len(models),
                            expert_boundaries=[float(adapter.model_timestep(b)) for b in boundaries(student)])
    for dst, src in zip(switch.experts, models):
        dst.load_state_dict(src.state_dict())
    return switch.eval()


def _save_text_to_image(cfg: RunConfig, teacher, student: FewStepGenerator, models, lora_sd, sched, tmp: Path):
    swapped, updates = {teacher.folder: models[0]}, {}
    if len(models) == 2 and teacher.pipeline_class in TWO_EXPERT_PIPELINES:
        # Wan 2.2 layout: `transformer` at t >= boundary, `transformer_2` below
        T = teacher.scheduler_config.get("num_train_timesteps", 1000)
        swapped[TWO_EXPERT_PIPELINES[teacher.pipeline_class]] = models[1]
        updates["boundary_ratio"] = boundaries(student)[0] / T
    elif len(models) > 1:       # a stock pipeline with one backbone slot: the expert switch takes it
        swapped[teacher.folder] = expert_switch(student, models)
    save_student_pipeline(teacher.path, tmp, swapped, sched, config_updates=updates)
    has_lora = lora_sd is not None and save_lora(type(teacher.pipe), tmp, teacher.folder, lora_sd, cfg.model.lora_rank,
                                                 student.denoiser.backbone.lora_targets)
    (tmp / "README.md").write_text(t2i_model_card(cfg, teacher, sched, has_lora))
    return list(swapped)     # the folders that hold the experts (FewStepGenerator.from_pretrained reads them)
