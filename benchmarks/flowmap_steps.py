"""Quality against the number of sampling steps for exported flow-map students (MeanFlow, TwinFlow) on digits.

    python benchmarks/flowmap_steps.py runs/meanflow_digits runs/twinflow_digits --out docs/benchmarks/flowmap_steps

A flow-map export (``--method.export flow_map``, the default of both methods) samples every step count from 1 to its
``export_steps`` with one backbone: its scheduler records the (t, r) pairs of each count. Each folder is scored at
every such count (``--steps``, default 1..8) with the bundled digits nets: class accuracy and FD-digits (mean over
``--seeds``), and the FD ratio to the teacher at its best (``fewstep.digits.teacher_grid``, read from its cache at
``--samples``; without a cached grid at that count the ratio is left out). Writes ``flowmap_steps.json``,
``flowmap_steps.md`` and ``flowmap_steps.png`` (FD-digits and accuracy against steps, one line per student) into
``--out``. FD-digits is a Frechet distance in the digits net's feature space, not FID.

A one-step consistency export (sCM, rCM, LCM: "x0, then fresh noise" students whose x0 is a consistency function,
valid at every t) is sampled the same way with ``--multistep``: at k steps on the even list from its trained timestep,
``t_i = t_0 - i (t_0 + 1) / k`` (999 -> [999, 499] at 2, [999, 749, 499, 249] at 4), passed as the pipeline's
``timesteps``: the consistency models' multistep sampler (re-noise the x0 estimate to the next t with fresh noise).
``--quality`` adds precision and recall (k = 3) and the second feature net's FD at each count.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_counts(folder: Path) -> int:
    """How many step counts a flow-map export samples (0 for any other folder)."""
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return len(cfg.get("flow_map_timesteps") or [])


def reference(n: int) -> float | None:
    """The teacher's best FD-digits at ``n`` samples from its cached grid, or None."""
    from fewstep.digits import DIGITS_TEACHER
    from fewstep.digits.teacher_grid import teacher_best

    try:
        return teacher_best(DIGITS_TEACHER, n, compute=False)["best"]["fd_digits"]
    except LookupError:
        return None


def trained_list(folder: Path) -> list[int]:
    """The export's trained t-list (empty when its scheduler records none)."""
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return list(cfg.get("train_timesteps") or [])


def even_list(t0: int, k: int) -> list[int]:
    """k descending timesteps from ``t0``, evenly spaced, trailing: ``t_i = t_0 - i (t_0 + 1) / k``."""
    return [int(round(t0 - i * (t0 + 1) / k)) for i in range(k)]


class AtList:
    """The pipeline, sampling on ``timesteps`` whatever step count its caller asks for (its length is the count)."""

    def __init__(self, pipe, timesteps: list[int]):
        self.pipe, self.timesteps = pipe, timesteps

    def __call__(self, labels, num_inference_steps=None, **kw):
        return self.pipe(labels, timesteps=self.timesteps, **kw)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


QUALITY = ("fd_digits_net2", "precision", "recall", "precision_net2", "recall_net2")


def measure(folder: Path, steps: list[int], n: int, seeds: tuple[int, ...], ref: float | None,
            multistep: bool = False, quality: bool = False) -> list[dict]:
    from fewstep.digits import scoring

    pipe, rows = scoring.load_pipeline(folder), []
    for k in steps:
        s = (scoring.score(AtList(pipe, even_list(trained_list(folder)[0], k)), n, seeds, quality=quality)
             if multistep else scoring.score(pipe, n, seeds, steps=k, quality=quality))
        rows.append({"student": folder.name, "steps": k, "accuracy": s["accuracy"], "fd_digits": s["fd_digits"],
                     "fd_digits_std": s["fd_digits_std"], "fd_ratio": s["fd_digits"] / ref if ref else None,
                     **({key: s[key] for key in QUALITY} if quality else {})})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["student"] for r in rows):
        mine = [r for r in rows if r["student"] == name]
        a.errorbar([r["steps"] for r in mine], [r["fd_digits"] for r in mine],
                   yerr=[r["fd_digits_std"] for r in mine], marker="o", label=name)
        b.plot([r["steps"] for r in mine], [r["accuracy"] for r in mine], marker="o", label=name)
    a.set(xlabel="sampling steps", ylabel="FD-digits (lower is better)", title="FD-digits vs steps")
    b.set(xlabel="sampling steps", ylabel="class accuracy", title="accuracy vs steps")
    a.legend()
    fig.tight_layout()
    fig.savefig(out / "flowmap_steps.png", dpi=120)


def table(rows: list[dict], n: int, seeds, ref) -> str:
    head = (f"FD-digits and class accuracy of each export at every step count ({n} samples x seeds "
            f"{list(seeds)}); FD ratio to the teacher at its best (FD-digits {ref:.2f})." if ref else
            f"({n} samples x seeds {list(seeds)}; no cached teacher grid at this sample count: no ratio.)")
    quality = bool(rows) and "precision" in rows[0]
    cols = " precision / recall |" if quality else ""
    lines = [head, "", "| student | steps | accuracy | FD-digits | FD ratio |" + cols,
             "|---|---|---|---|---|" + ("---|" if quality else "")]
    for r in rows:
        ratio = f"{r['fd_ratio']:.2f}" if r["fd_ratio"] else "–"
        spread = f" ± {r['fd_digits_std']:.1f}" if len(seeds) > 1 else ""     # no spread from one seed
        pr = f" {r['precision']:.3f} / {r['recall']:.3f} |" if quality else ""
        lines.append(f"| {r['student']} | {r['steps']} | {r['accuracy']:.3f} | {r['fd_digits']:.1f}{spread} | {ratio} |"
                     + pr)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path,
                   help="exported flow-map student folders (run folders), or with --multistep one-step consistency ones")
    p.add_argument("--out", type=Path, default=Path("reports/flowmap_steps"))
    p.add_argument("--steps", default="1-8", help="step counts, e.g. 1-8 or 1,2,4")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--multistep", action="store_true",
                   help="the folders are one-step consistency exports (sCM, rCM, LCM): sample k steps on the even "
                        "list from their trained timestep")
    p.add_argument("--quality", action="store_true",
                   help="also precision and recall (k = 3) and the second feature net's FD at every step count")
    args = p.parse_args(argv)
    lo, _, hi = args.steps.partition("-")
    wanted = list(range(int(lo), int(hi) + 1)) if hi else [int(v) for v in args.steps.split(",")]
    seeds = tuple(int(v) for v in args.seeds.split(","))
    for f in args.folders:
        if not (f / "scheduler" / "scheduler_config.json").is_file():
            print(f"error: {f} holds no exported pipeline (no scheduler/scheduler_config.json); pass a run folder "
                  "whose training finished", file=sys.stderr)
            return 2
        if args.multistep and len(trained_list(f)) != 1:
            print(f"error: --multistep takes one-step consistency exports; {f} was trained on "
                  f"{trained_list(f) or 'no t-list'}", file=sys.stderr)
            return 2
        if not args.multistep and step_counts(f) == 0:
            print(f"error: {f} is not a flow-map export (its scheduler records no flow_map_timesteps); export with "
                  "--method.export flow_map, or pass --multistep for a one-step consistency export", file=sys.stderr)
            return 2
    ref, rows = reference(args.samples), []
    for f in args.folders:
        counts = wanted if args.multistep else [k for k in wanted if k <= step_counts(f)]
        rows += measure(f, counts, args.samples, seeds, ref, args.multistep, args.quality)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flowmap_steps.json").write_text(json.dumps(rows, indent=2))
    (args.out / "flowmap_steps.md").write_text(table(rows, args.samples, seeds, ref))
    plot(rows, args.out)
    print(table(rows, args.samples, seeds, ref))
    print(f"wrote {args.out / 'flowmap_steps.md'}, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
