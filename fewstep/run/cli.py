"""The body of every ``train/<method>.py``: parse, validate, build, train, export, evaluate.

Every user mistake ends in one ``error: ...`` line and exit code 2, before any work and before anything
is deleted; a run interrupted by Ctrl-C or SIGTERM saves a checkpoint and says how to resume.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from fewstep.errors import CheckpointError, ConfigError, NonFiniteError
from fewstep.run import config as C
from fewstep.run import outdir
from fewstep.run.help import help_text
from fewstep.run.presets import PRESETS, default_preset
from fewstep.run.validate import validate


def fail(e: Exception, code: int = 2):
    print(f"error: {e}", file=sys.stderr)
    sys.exit(code)


def parse_or_exit(argv: list[str], method_name: str, doc: str) -> tuple[C.RunConfig, bool]:
    """The validated config and the dry-run flag; ``--help`` prints the page of the chosen preset."""
    presets = PRESETS[method_name]
    try:
        if any(a in ("-h", "--help") for a in argv):
            name = default_preset(method_name)
            for i, a in enumerate(argv):
                if a == "--preset" and i + 1 < len(argv):
                    name = argv[i + 1]
                elif a.startswith("--preset="):
                    name = a.partition("=")[2]
            C.parse(["--preset", name], presets, name)     # an unknown preset is an error here too
            print(help_text(f"train/{method_name}.py", doc, presets, name))
            sys.exit(0)
        cfg, dry = C.parse(argv, presets, default_preset(method_name))
        if cfg.method_name != method_name:
            raise ConfigError(f"preset {cfg.preset!r} is for {cfg.method_name}, not {method_name}")
        validate(cfg)
        outdir.check(cfg)
        return cfg, dry
    except ConfigError as e:
        fail(e)


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs of /proc/cpuinfo; 0 where it cannot be read."""
    pairs, phys = set(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                pairs.add((phys, line.split(":")[1].strip()))
    except OSError:
        return 0
    return len(pairs)


def accelerate_defaulted_threads() -> bool:
    """Whether ``OMP_NUM_THREADS`` was set by ``accelerate launch`` on its own rather than asked for: its single
    process launcher passes 1 unless the user set the variable or ``--num_cpu_threads_per_process``. Read from the
    launcher's own command line and environment (Linux /proc); False wherever that cannot be read."""
    try:
        parent = Path("/proc") / str(os.getppid())
        cmd = (parent / "cmdline").read_bytes().split(b"\0")
        env = (parent / "environ").read_bytes().split(b"\0")
    except OSError:
        return False
    launch = any(Path(c.decode(errors="replace")).name == "accelerate" for c in cmd) and b"launch" in cmd
    asked = any(e.startswith(b"OMP_NUM_THREADS=") for e in env) or \
        any(c.startswith(b"--num_cpu_threads_per_process") for c in cmd)
    return launch and not asked


def threads() -> int:
    """Torch's CPU threads: ``OMP_NUM_THREADS`` when the user set it, else the physical cores this process may use
    (a hyperthread sibling busy with the same work slows torch down)."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and not accelerate_defaulted_threads():
        return max(1, int(omp))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(physical_cores() or usable, usable))


def unsharded_student(cfg: C.RunConfig, method, ema, main: bool, source=None):
    """Gather the FSDP-sharded student (EMA weights swapped in) on every rank, and on the main process load
    it into a freshly built, unsharded method; other ranks get None."""

    from fewstep.run import build
    from fewstep.training import distributed

    with ema.swapped() if ema is not None else nullcontext():
        full = distributed.gather_module(method.student)      # collective
    if not main:
        return None
    fresh = build.make_method(cfg, build.load_teacher(cfg.model), source)
    fresh.student.load_state_dict(full)
    return fresh


def main(method_name: str, doc: str = "", argv: list[str] | None = None) -> Path | None:
    """Parse ``argv`` (default ``sys.argv[1:]``), build method ``method_name`` the one way
    (``build.make_method``), train, export and evaluate. Returns the run folder (None for ``--dry-run``)."""
    cfg, dry = parse_or_exit(sys.argv[1:] if argv is None else list(argv), method_name, doc)
    if dry:
        print(json.dumps(cfg.to_dict(), indent=2))
        return None
    # the work's modules (diffusers, accelerate, the export) load only once the config has passed: --help, --dry-run
    # and every refused config answer in a few seconds
    from fewstep.run import build, export, report, samples
    from fewstep.training import loop

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):   # set by a DeepSpeed config
        # a DeepSpeed engine owns one model and one optimizer; a fewstep step updates two networks with
        # two optimizers in turns, which accelerate's DeepSpeed integration cannot express
        fail(ConfigError("DeepSpeed is not supported: fewstep trains student and critic with separate "
                         "optimizers in turns; shard large backbones with train/accelerate/fsdp.yaml instead"))
    if not torch.cuda.is_available():
        torch.set_num_threads(threads())
    try:
        teacher = build.load_teacher(cfg.model)
        source = build.make_source(cfg, teacher)
        torch.manual_seed(cfg.train.seed)    # initialization of new modules (heads, adapters)
        method = build.make_method(cfg, teacher, source)
        export.check(teacher, method.student)
    except ConfigError as e:
        fail(e)
    out = Path(cfg.train.output_dir)
    accelerator = build.accelerator(cfg.train.mixed_precision, str(out))
    lock = None
    if accelerator.is_main_process:
        try:
            lock = outdir.RunLock(out).acquire()
            if outdir.check(cfg):         # every check has passed: only now is a previous run replaced
                outdir.replace(out)
        except ConfigError as e:
            fail(e)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        accelerator.init_trackers("fewstep", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                     for k, v in C.flatten(cfg).items()})
    accelerator.wait_for_everyone()
    method.to(accelerator.device)
    if hasattr(source, "to"):     # text-to-image: prompt encoders and VAE run beside the backbones
        source.to(accelerator.device)
    started = time.perf_counter()
    try:
        result = loop.train(cfg, method, source, accelerator,
                            on_sample=lambda step, ema: samples.sample_grid(cfg, method, source, ema, step))
    except (NonFiniteError, CheckpointError) as e:
        fail(e, 1)
    except loop.Interrupted as e:
        print(f"{e}", file=sys.stderr)
        sys.exit(e.code)
    accelerator.end_training()
    result["train_seconds"] = time.perf_counter() - started
    ema = result["ema"]
    if result["root"] is not None:     # FSDP: export from an unsharded copy of the (EMA) student
        method, ema = unsharded_student(cfg, method, ema, accelerator.is_main_process, source), None
    if accelerator.is_main_process:
        print(f"exporting the student to {out} ...", file=sys.stderr)
        export.export_student(cfg, teacher, method.student, ema)
        if cfg.train.evaluate:
            print("evaluating the exported student against its teacher (metrics.json) ...", file=sys.stderr)
            report.write_metrics(cfg, result)
        print(f"done: {out.resolve()}", file=sys.stderr)
    if lock is not None:
        lock.release()
    return out
