"""Score a class-conditional teacher over its sampler grid (`fewstep.digits.teacher_grid`) and write the table.

    python benchmarks/teacher_grid.py                      # the bundled digits teacher, final at 2000 samples
    python benchmarks/teacher_grid.py --teacher path/to/teacher --out docs/benchmarks/teacher_grid.md

The result is cached beside the teacher (``teacher_grid.json``, keyed by its weights' hash): training runs'
``metrics.json`` read the same reference, and a second call here only reprints the table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def table(result: dict) -> str:
    from fewstep.digits.teacher_grid import label

    lines = [f"Teacher grid: {result['protocol']}. Weights sha256 {result['weights_sha256'][:16]}...", "",
             "| setting | NFE | accuracy (screen) | FD-digits (screen) |", "|---|---|---|---|"]
    for r in sorted(result["screen"], key=lambda r: r["fd_digits"]):
        nfe = r["steps"] * (1 if r["guidance_scale"] == 1.0 else 2)
        lines.append(f"| {label(r)} | {nfe} | {r['accuracy']:.3f} | {r['fd_digits']:.2f} |")
    lines += ["", "Final (the reference students are divided by):", "",
              "| setting | samples x seeds | accuracy | FD-digits | FD-digits net 2 | precision | recall | "
              "median NN-train distance |", "|---|---|---|---|---|---|---|---|"]
    for r in result["final"]:
        lines.append(f"| {label(r)} | {r['num_samples']} x {len(r['seeds'])} | {r['accuracy']:.3f} | "
                     f"{r['fd_digits']:.2f} ± {r['fd_digits_std']:.2f} | {r['fd_digits_net2']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['nearest_train']['median']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    from fewstep.digits import DIGITS_TEACHER, teacher_grid

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, default=DIGITS_TEACHER)
    p.add_argument("--samples", type=int, default=2000, help="final protocol: samples per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=list(teacher_grid.FINAL_SEEDS))
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = p.parse_args()
    result = teacher_grid.teacher_best(args.teacher, args.samples, tuple(args.seeds))
    rows = result["screen"] + result["final"]
    text = table(result) + ("\nCommand: `python benchmarks/teacher_grid.py` (the cache it fills is "
                            "fewstep/assets/digits_teacher/teacher_grid.json).\n"
                            f"\nMeasured on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
                            f" at {rows[0]['threads']} thread(s): {sum(r['seconds'] for r in rows):.0f} s of scoring "
                            "(summed over the settings, stored in the cache).\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
