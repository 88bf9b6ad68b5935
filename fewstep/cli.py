"""Shared entry-point logic of ``train/<method>.py``: parse, guard the output folder, build, train,
export, evaluate. Every user mistake ends in a one-line ``error: ...`` and exit code 2."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from . import config as C
from .presets import PRESETS


def _flat(nested: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in nested.items():
        if k in ("method_name", "preset") and not prefix:
            continue
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def guard_output(cfg: C.RunConfig) -> None:
    """Refuse an output folder that holds a different run (or other files) unless ``train.overwrite``."""
    out = Path(cfg.train.output_dir)
    if not out.exists() or not any(out.iterdir()):
        return
    saved = out / "config.json"
    if cfg.train.overwrite:
        if int(os.environ.get("RANK", "0")) == 0:    # under accelerate launch only the first process deletes
            shutil.rmtree(out)
        return
    if not saved.is_file():
        raise C.ConfigError(f"output directory {str(out)!r} is not empty and holds no fewstep run; choose another "
                            "--train.output_dir or pass --train.overwrite true to replace its contents")
    old = json.loads(saved.read_text())
    new = cfg.to_dict()
    changed = C.diff(_flat(old), _flat(new))
    if old.get("method_name") != new["method_name"]:
        changed.insert(0, "method")
    if changed:
        k = changed[0]
        detail = f"{k}: {_flat(old).get(k)!r} -> {_flat(new).get(k)!r}" if k != "method" else \
            f"method: {old.get('method_name')!r} -> {new['method_name']!r}"
        raise C.ConfigError(f"output directory {str(out)!r} holds a run with a different config ({detail}"
                            f"{f', +{len(changed) - 1} more' if len(changed) > 1 else ''}); pass another "
                            "--train.output_dir, or --train.overwrite true to replace that run")


def parse_or_exit(argv, method_name: str, doc: str, prog: str, default_preset: str) -> tuple[C.RunConfig, bool]:
    presets = PRESETS[method_name]
    if any(a in ("-h", "--help") for a in argv):
        print(C.help_text(prog, doc, presets, default_preset))
        sys.exit(0)
    try:
        cfg, dry = C.parse(argv, presets, default_preset)
        if cfg.method_name != method_name:
            raise C.ConfigError(f"preset {cfg.preset!r} is for {cfg.method_name}, not {method_name}")
        guard_output(cfg)
        return cfg, dry
    except C.ConfigError as e:
        fail(e)


def fail(e: Exception):
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def unsharded_student(cfg: C.RunConfig, method, ema, make_method, main: bool):
    """Gather the FSDP-sharded student (EMA weights swapped in) on every rank, and on the main process load
    it into a freshly built, unsharded method for export; other ranks get (None, None)."""
    from contextlib import nullcontext

    from . import build, distributed

    with ema.swapped() if ema is not None else nullcontext():
        full = distributed.gather_module(method.student)      # collective
    if not main:
        return None, None
    fresh = make_method(cfg, build.load_teacher(cfg.model))
    fresh.student.load_state_dict(full)
    return fresh, None


def run(method_name: str, doc: str, prog: str, default_preset: str, make_method, argv=None) -> Path | None:
    """Parse ``argv``, build with ``make_method(cfg, teacher)``, train, export and evaluate."""
    import torch

    from . import build, loop
    from .finish import check_export, export_student, make_source, sample_grid, write_metrics

    cfg, dry = parse_or_exit(sys.argv[1:] if argv is None else argv, method_name, doc, prog, default_preset)
    if dry:
        print(json.dumps(cfg.to_dict(), indent=2))
        return None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):   # set by a DeepSpeed config
        # a DeepSpeed engine owns one model and one optimizer; a fewstep step updates two networks with
        # two optimizers in turns, which accelerate's DeepSpeed integration cannot express
        fail(C.ConfigError("DeepSpeed is not supported: fewstep trains student and critic with separate "
                           "optimizers in turns; shard large backbones with train/accelerate/fsdp.yaml instead"))
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(1)   # 2-core machines: a second busy thread slows torch by up to 80x
    try:
        teacher = build.load_teacher(cfg.model)
        source = make_source(cfg, teacher)
        torch.manual_seed(cfg.train.seed)    # initialization of new modules (heads, adapters)
        method = make_method(cfg, teacher)
        check_export(cfg, teacher, method)
    except C.ConfigError as e:
        fail(e)
    out = Path(cfg.train.output_dir)
    accelerator = build.accelerator(cfg.train.mixed_precision, str(out))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        accelerator.init_trackers("fewstep", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                     for k, v in C.flatten(cfg).items()})
    method.to(accelerator.device)
    if hasattr(source, "to"):     # text-to-image: prompt encoders and VAE run beside the backbones
        source.to(accelerator.device)
    started = time.perf_counter()
    try:
        result = loop.train(cfg, method, source, accelerator,
                            on_sample=lambda step, ema: sample_grid(cfg, method, source, ema, step))
    except (loop.NonFiniteError, loop.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    accelerator.end_training()
    result["train_seconds"] = time.perf_counter() - started
    ema = result["ema"]
    if result["root"] is not None:     # FSDP: export from an unsharded copy of the (EMA) student
        method, ema = unsharded_student(cfg, method, ema, make_method, accelerator.is_main_process)
    if accelerator.is_main_process:
        export_student(cfg, teacher, method, ema)
        if cfg.train.evaluate:
            write_metrics(cfg, result)
    return out
