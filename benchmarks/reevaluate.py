"""Rewrite the ``metrics.json`` of finished digits runs against the current reference (the teacher at its best).

    python benchmarks/reevaluate.py runs/dmd2_digits /tmp/sweep/g10 ...

For runs evaluated before the reference moved from the teacher at CFG 2 to its best setting: the exported student
in each folder is scored again exactly as a training run's evaluation does (`fewstep.run.report.write_metrics`);
training figures (updates, steps, seconds) are carried over from the old file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace


def main():
    from fewstep.run import report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args()
    for run in args.runs:
        saved, old = json.loads((run / "config.json").read_text()), json.loads((run / "metrics.json").read_text())
        cfg = SimpleNamespace(
            data=SimpleNamespace(source=saved["data"]["source"]),
            model=SimpleNamespace(teacher=saved["model"]["teacher"],
                                  student_timesteps=tuple(saved["model"]["student_timesteps"])),
            train=SimpleNamespace(output_dir=str(run), eval_samples=saved["train"]["eval_samples"]))
        report.write_metrics(cfg, {"updates": old["updates"], "step": old["steps"],
                                   "train_seconds": old.get("train_seconds")})


if __name__ == "__main__":
    main()
