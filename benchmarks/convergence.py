"""A DMD2-family method against DMD2 at equal generator updates on digits: FD and output statistics after N
generator updates, for several N.

- ``--method disback``: DisBack (arXiv 2408.15991) claims faster convergence than the score distillation it builds on.
- ``--method decoupled_dmd``: Decoupled DMD (arXiv 2511.22677) addresses the oversaturation and collapse of DMD under
  guidance; both then target the same guided distribution and differ only in how the DMD gradient is split and
  re-noised.

DMD2 is given the rival's real-score guidance (unless ``--dmd2`` sets it), so both runs distil the same target.

This trains the rival's digits preset and ``digits_dmd2`` once each (with the overrides given), to the largest N,
keeping the checkpoint at every N (DMD2 and Decoupled DMD: step N x student_every; DisBack: record_steps + N x
student_every, its recording stage makes no generator update); then exports the student of each kept checkpoint
(EMA weights, as a run's own export) and scores it as a run's evaluation does (FD-digits, accuracy, precision /
recall, per-class FD, mean and spread over the seeds; the FD ratio to the teacher at its best where the teacher grid
is cached at that sample count: 2,000), with the output statistics of the first seed's samples in pixel space: the
per-class pixel variance (mean over classes and pixels; collapse drives it to 0) and the saturated fraction
(|x| > 0.95), beside the same figures of the 1,797 real digits. It prints one table and writes it, with every
figure, to ``<out>/convergence.json``.

    python benchmarks/convergence.py --method disback --updates 40,120,180,200 --out runs/convergence_disback
    python benchmarks/convergence.py --method decoupled_dmd --updates 80,160,240 --out runs/convergence_decoupled
    python benchmarks/convergence.py --updates 40,80,120,200 --common data.batch_size=64 \
        --rival method.record_steps=400 method.snapshot_every=100
    # a smoke run (seconds of training, no meaningful figures)
    python benchmarks/convergence.py --updates 1,2 --samples 50 --seeds 0 --out /tmp/dbc \
        --common data.batch_size=4 --rival method.record_steps=2 method.snapshot_every=1 method.interval=1

Both runs live in ``<out>/<method>/`` (resumed, not restarted, when the command is run again with the same settings:
the loop resumes from the newest checkpoint); each scored student in ``<out>/<method>/N<n>/``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
from functools import reduce
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRESET = {"dmd2": "digits_dmd2", "disback": "digits_disback", "decoupled_dmd": "digits_decoupled_dmd"}
NAME = {"dmd2": "DMD2", "disback": "DisBack", "decoupled_dmd": "Decoupled DMD"}
SATURATED = 0.95      # |x| above this counts as a saturated pixel (images in [-1, 1])


def overrides(pairs: list[str]) -> list[str]:
    """``["a.b=1", ...]`` -> ``["--a.b", "1", ...]`` (the entry scripts' dotted overrides)."""
    out = []
    for p in pairs:
        if "=" not in p:
            raise SystemExit(f"error: override {p!r} is not key=value (e.g. data.batch_size=64)")
        key, value = p.split("=", 1)
        out += [f"--{key}", value]
    return out


def config(method: str, argv: list[str]):
    """The run config the entry script would build from ``argv``, validated (a bad override fails here, at once)."""
    from fewstep.run import config as C
    from fewstep.run.presets import PRESETS
    from fewstep.run.validate import validate

    cfg, _ = C.parse(argv, PRESETS[method], PRESET[method])
    validate(cfg)
    return cfg


def step_of(cfg, n: int) -> int:
    """The step after which the student has made ``n`` updates."""
    return getattr(cfg.method, "record_steps", 0) + n * cfg.method.student_every


def train(method: str, argv: list[str]) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "train" / f"{method}.py"), *argv], cwd=ROOT, check=False)
    if r.returncode:
        raise SystemExit(f"error: the {method} run failed (exit {r.returncode}); its output is above")


def teacher_fd(samples: int, seeds) -> float | None:
    """FD-digits of the teacher at its best at ``samples`` (from the cached grid; None where it is not cached, so a
    smoke run never scores the teacher nor writes into its folder)."""
    from fewstep.digits import DIGITS_TEACHER, teacher_grid

    try:
        return teacher_grid.teacher_best(DIGITS_TEACHER, samples, compute=False)["best"]["fd_digits"]
    except LookupError:
        return None


def output_stats(x, labels) -> dict:
    """Pixel-space statistics of images ``x`` in [-1, 1] with class ``labels``: the per-class pixel variance (mean
    over classes and pixels) and the fraction of saturated pixels (``|x| > SATURATED``)."""
    import torch

    var = torch.stack([x[labels == c].var(0, unbiased=True).mean() for c in labels.unique()]).mean()
    return {"class_variance": float(var), "saturated": float((x.abs() > SATURATED).float().mean())}


def real_stats() -> dict:
    """``output_stats`` of the real digits at the teacher's size (the digits the teacher was trained on)."""
    from fewstep.digits.data import load_digits

    return output_stats(*load_digits())


def score(method: str, cfg, steps: dict[int, int], samples: int, seeds) -> dict[int, dict]:
    """Export and score the student of the checkpoint at ``steps[n]`` for every n."""
    from fewstep.core.ema import EMA
    from fewstep.digits import scoring
    from fewstep.run import build, export
    from fewstep.training import checkpoint

    teacher = build.load_teacher(cfg.model)
    net = build.make_method(cfg, teacher)
    run = Path(cfg.train.output_dir)
    rows = {}
    for n, step in steps.items():
        path = run / "checkpoints" / f"step_{step:08d}"
        state = checkpoint.load(path)
        net.student.load_state_dict(state["modules"]["student"])
        ema = None
        if state["ema"] is not None:
            ema = EMA(net.trainable()["student"], cfg.train.ema_decay)
            ema.load_state_dict(state["ema"])
        folder_cfg = copy.deepcopy(cfg)
        folder_cfg.train.output_dir = str(run / f"N{n}")
        Path(folder_cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        export.export_student(folder_cfg, teacher, net.student, ema)
        pipe = scoring.load_pipeline(folder_cfg.train.output_dir)
        s = scoring.score(pipe, samples, seeds, quality=True)
        stats = output_stats(*scoring.generate(pipe, samples, seeds[0]))      # the first seed's images again
        rows[n] = {"step": step, "updates": state["updates"], **{k: v for k, v in s.items() if k != "nearest_train"},
                   **stats}
        (run / f"N{n}" / "score.json").write_text(json.dumps(rows[n], indent=2))
        print(f"{method} N={n} (step {step}): FD-digits {s['fd_digits']:.2f}, accuracy {s['accuracy']:.3f}",
              file=sys.stderr, flush=True)
    return rows


def table(results: dict, rival: str, updates: list[int], best: float | None, real: dict) -> str:
    """One row per N: FD-digits of both (and its ratio to the teacher at its best, where known), accuracy, recall,
    per-class pixel variance and saturated fraction."""
    def fd(r):
        return f"{r['fd_digits']:.2f}" + (f" ({r['fd_digits'] / best:.2f}x)" if best else "")

    a_, b_ = NAME["dmd2"], NAME[rival]
    head = (f"| N | {a_} FD-digits | {b_} FD-digits | {b_} / {a_} | {a_} acc | {b_} acc | {a_} recall | {b_} recall | "
            f"{a_} class variance | {b_} class variance | {a_} saturated | {b_} saturated |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in updates:
        a, b = results["dmd2"][n], results[rival][n]
        lines.append(f"| {n} | {fd(a)} | {fd(b)} | {b['fd_digits'] / a['fd_digits']:.3f} | {a['accuracy']:.3f} | "
                     f"{b['accuracy']:.3f} | {a['recall']:.3f} | {b['recall']:.3f} | {a['class_variance']:.4f} | "
                     f"{b['class_variance']:.4f} | {a['saturated']:.3f} | {b['saturated']:.3f} |")
    v, f = f"{real['class_variance']:.4f}", f"{real['saturated']:.3f}"
    lines.append(f"| real digits | | | | | | | | {v} | {v} | {f} | {f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("disback", "decoupled_dmd"), default="disback",
                   help="the method run against DMD2 (default: disback)")
    p.add_argument("--updates", default="40,80,120,200", help="generator update counts N, comma-separated")
    p.add_argument("--out", type=Path, default=None, help="default: runs/convergence_<method>")
    p.add_argument("--samples", type=int, default=2000, help="samples per seed for each score")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--common", nargs="*", default=[], help="overrides for both runs, key=value")
    p.add_argument("--rival", nargs="*", default=[], help="overrides for the --method run, key=value")
    p.add_argument("--dmd2", nargs="*", default=[], help="overrides for the DMD2 run, key=value")
    args = p.parse_args()
    rival = args.method
    args.out = args.out or Path(f"runs/convergence_{rival}")
    updates = sorted({int(u) for u in args.updates.split(",")})
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if not updates or updates[0] < 1:
        raise SystemExit("error: --updates needs generator update counts >= 1, e.g. 40,80,120,200")
    from fewstep.run import build

    plans = {}
    extra = {"dmd2": list(args.dmd2), rival: list(args.rival)}
    if not any(o.startswith("method.guidance_scale=") for o in args.dmd2):
        # the same guided target for both (Decoupled DMD's presets guide at 1.25, and a rival preset may keep the
        # guidance of its own measured run): the comparison is of the methods, not of their targets
        w = config(rival, overrides(args.common) + overrides(args.rival)).method.guidance_scale
        extra["dmd2"].append(f"method.guidance_scale={w}")
    for method in ("dmd2", rival):      # every config is checked before any training starts
        base = overrides(args.common) + overrides(extra[method])
        probe = config(method, base)
        steps = {n: step_of(probe, n) for n in updates}
        every = reduce(math.gcd, steps.values())
        argv = base + ["--train.output_dir", str(args.out / method), "--train.max_steps", str(max(steps.values())),
                       "--train.checkpoint_every", str(every), "--train.keep_every", str(every),
                       "--train.keep_last", "1", "--train.evaluate", "false", "--train.sample_every", "1000000"]
        cfg = config(method, argv)
        build.make_method(cfg, build.load_teacher(cfg.model))     # the build-time checks (DisBack's path length)
        plans[method] = (cfg, argv, steps)
    results = {}
    for method, (cfg, argv, steps) in plans.items():
        print(f"training {method} to {max(steps.values())} steps ({updates[-1]} generator updates) ...",
              file=sys.stderr, flush=True)
        train(method, argv)
        results[method] = score(method, cfg, steps, args.samples, seeds)
    best, real = teacher_fd(args.samples, seeds), real_stats()
    text = table(results, rival, updates, best, real)
    report = {"method": rival, "updates": updates, "samples": args.samples, "seeds": list(seeds),
              "teacher_best_fd_digits": best, "real_digits": real,
              "runs": {m: {"argv": plans[m][1], "steps": plans[m][2]} for m in plans},
              "results": {m: {str(n): r for n, r in results[m].items()} for m in results}, "table": text}
    (args.out / "convergence.json").write_text(json.dumps(report, indent=2))
    print(text)


if __name__ == "__main__":
    main()
