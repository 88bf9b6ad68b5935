"""MSD with K = 2 students (digits 0-4 and 5-9) against one DMD2 student at the same total updates, on digits.

Multi-Student Distillation (arXiv 2410.23274) claims a quality gain over one same-size student at the same inference
cost. This trains ``digits_msd`` and ``digits_dmd2`` for the same number of steps on the same batches (the same
batch size, TTUR and learning rates: the same number of generator and critic updates; MSD's two pairs share each
batch, so each student sees its half), then scores both exported students as a run's evaluation does: FD-digits,
class accuracy, precision / recall (mean over the seeds), the FD ratio to the teacher at its best where the teacher
grid is cached at that sample count (2,000), and the mean per-class FD of each subset (0-4, 5-9). One table is
printed and written, with every figure and the training times, to ``<out>/msd_vs_single.json``.

    python benchmarks/msd_vs_single.py --steps 1200 --out runs/msd_vs_single
    # each MSD student with a whole batch of its own (twice the samples per step)
    python benchmarks/msd_vs_single.py --steps 1200 --msd data.batch_size=64
    # a smoke run (seconds of training, no meaningful figures)
    python benchmarks/msd_vs_single.py --steps 2 --samples 50 --seeds 0 --out /tmp/msd_smoke --common data.batch_size=4

Each run lives in ``<out>/<method>/`` (a second invocation with the same settings resumes it from its checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRESET = {"dmd2": "digits_dmd2", "msd": "digits_msd"}
SUBSETS = {"0-4": range(5), "5-9": range(5, 10)}


def overrides(pairs: list[str]) -> list[str]:
    """``["a.b=1", ...]`` -> ``["--a.b=1", ...]``: the entry scripts' dotted overrides."""
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise SystemExit(f"error: override {bad[0]!r} is not key=value (e.g. data.batch_size=64)")
    return [f"--{p}" for p in pairs]


def check(method: str, argv: list[str]) -> None:
    """Fail at once on a bad override: the config the entry script would build, validated."""
    from fewstep.errors import ConfigError
    from fewstep.run import config as C
    from fewstep.run.presets import PRESETS
    from fewstep.run.validate import validate

    try:
        validate(C.parse(argv, PRESETS[method], PRESET[method])[0])
    except ConfigError as e:
        raise SystemExit(f"error: {method}: {e}") from None


def train(method: str, argv: list[str]) -> float:
    """Run ``train/<method>.py`` (training and export, no evaluation); its wall time in seconds."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "train" / f"{method}.py"), *argv], cwd=ROOT, check=False)
    if r.returncode:
        raise SystemExit(f"error: the {method} run failed (exit {r.returncode}); its output is above")
    return time.perf_counter() - t0


def score(folder: Path, samples: int, seeds) -> dict:
    from fewstep.digits import scoring

    s = scoring.score(scoring.load_pipeline(folder), samples, seeds, quality=True)
    s.pop("nearest_train", None)
    per_class = {int(c): v for c, v in s["per_class_fd"].items()}
    s["subset_fd"] = {name: sum(per_class[c] for c in cs) / len(cs) for name, cs in SUBSETS.items()}
    return s


def teacher_fd(samples: int) -> float | None:
    """FD-digits of the teacher at its best at ``samples`` (the cached grid only; None where it is not cached)."""
    from fewstep.digits import DIGITS_TEACHER, teacher_grid

    try:
        return teacher_grid.teacher_best(DIGITS_TEACHER, samples, compute=False)["best"]["fd_digits"]
    except LookupError:
        return None


def table(results: dict, best: float | None) -> str:
    head = ("| student | FD-digits | FD ratio | accuracy | precision | recall | FD 0-4 (per class) "
            "| FD 5-9 (per class) | train s |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for label, method in (("one student (DMD2)", "dmd2"), ("MSD, K = 2", "msd")):
        r = results[method]
        ratio = f"{r['fd_digits'] / best:.2f}" if best else "-"
        lines.append(f"| {label} | {r['fd_digits']:.2f} +- {r['fd_digits_std']:.2f} | {ratio} | {r['accuracy']:.3f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['subset_fd']['0-4']:.2f} | "
                     f"{r['subset_fd']['5-9']:.2f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1200, help="training steps of both runs (digits_dmd2's 1200)")
    p.add_argument("--out", type=Path, default=Path("runs/msd_vs_single"))
    p.add_argument("--samples", type=int, default=2000, help="samples per seed for each score")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--common", nargs="*", default=[], help="overrides for both runs, key=value")
    p.add_argument("--msd", nargs="*", default=[], help="overrides for the MSD run, key=value")
    p.add_argument("--dmd2", nargs="*", default=[], help="overrides for the one-student run, key=value")
    args = p.parse_args()
    if args.steps < 1:
        raise SystemExit("error: --steps must be >= 1")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    plans = {}
    for method in ("dmd2", "msd"):      # every config is checked before any training starts
        argv = overrides(args.common) + overrides(getattr(args, method)) + [
            "--train.output_dir", str(args.out / method), "--train.max_steps", str(args.steps),
            "--train.evaluate", "false", "--train.sample_every", str(max(args.steps, 1_000_000)),
            "--train.checkpoint_every", str(max(1, math.ceil(args.steps / 4)))]
        check(method, argv)
        plans[method] = argv
    results = {}
    for method, argv in plans.items():
        print(f"training {method} for {args.steps} steps ...", file=sys.stderr, flush=True)
        seconds = train(method, argv)
        print(f"scoring {method} ({args.samples} samples x {len(seeds)} seeds) ...", file=sys.stderr, flush=True)
        results[method] = {**score(args.out / method, args.samples, seeds), "train_seconds": seconds}
    best = teacher_fd(args.samples)
    text = table(results, best)
    report = {"steps": args.steps, "samples": args.samples, "seeds": list(seeds), "teacher_best_fd_digits": best,
              "argv": plans, "results": results, "table": text}
    (args.out / "msd_vs_single.json").write_text(json.dumps(report, indent=2))
    print(text)


if __name__ == "__main__":
    main()
