"""Run several training configurations side by side and collect their metrics.json into one table.

    python benchmarks/sweep.py --out /tmp/sweep --jobs 4 \
        "base=" "nogan=--method.gan_weight_student 0" "lr2=--optim.student.lr 2e-4 --optim.critic.lr 2e-4"

Each argument is ``name=<overrides>`` for ``train/<script>.py`` (default ``--script``, dmd2), or
``name:script=<overrides>`` to run another trainer (``sid4:sid=--preset digits_sid_4step``). Runs use their own output
folders under ``--out``; the table (markdown + JSON) goes to ``--out/sweep.md`` / ``sweep.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="name=overrides")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--script", default="dmd2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    queue = [r.split("=", 1) for r in args.runs]
    running, done = [], []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    while queue or running:
        while queue and len(running) < args.jobs:
            name, over = queue.pop(0)
            name, script = name.split(":", 1) if ":" in name else (name, args.script)
            cmd = [sys.executable, str(ROOT / "train" / f"{script}.py"), "--train.output_dir",
                   str(args.out / name), "--train.overwrite", "true", *shlex.split(over)]
            log = open(args.out / f"{name}.log", "w")
            running.append((name, over, time.time(), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                                      env=env, cwd=ROOT)))
        for item in list(running):
            name, over, t0, proc = item
            if proc.poll() is not None:
                running.remove(item)
                m = args.out / name / "metrics.json"
                row = {"name": name, "overrides": over, "rc": proc.returncode, "wall_s": time.time() - t0}
                if m.is_file():
                    row.update(figures(json.loads(m.read_text())))
                done.append(row)
                print(json.dumps(row), flush=True)
        time.sleep(1)
    (args.out / "sweep.json").write_text(json.dumps(done, indent=2))
    text = table(done)
    (args.out / "sweep.md").write_text(text)
    print(text)


def figures(m: dict) -> dict:
    """A sweep row's figures from a run's metrics.json: ratios to the teacher at its best (the reference)."""
    s, nan = m["student"], float("nan")
    return {"acc": s["accuracy"], "fd": s["fd_digits"], "fd_std": s["fd_digits_std"],
            "fd_net2": s.get("fd_digits_net2", nan), "precision": s.get("precision", nan),
            "recall": s.get("recall", nan), "ratio": m["fd_ratio_to_teacher"],
            "ratio_net2": m.get("fd_ratio_to_teacher_net2", nan), "recall_ratio": m.get("recall_ratio_to_teacher", nan),
            "reference": m.get("reference", "teacher at 50 DDIM steps, CFG 2"),
            "copies": m.get("memorisation", {}).get("copies"), "updates": m["updates"]}


def table(rows: list[dict]) -> str:
    refs = sorted({r["reference"] for r in rows if "reference" in r})
    lines = [f"Ratios divide by: {'; '.join(refs)}.", "",
             "| run | overrides | acc | FD-digits | FD ratio (net 1 / net 2) | precision | recall (ratio) | "
             "copies | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in rows:
        lines.append(f"| {r['name']} | `{r['overrides']}` | {r.get('acc', nan):.3f} | "
                     f"{r.get('fd', nan):.1f} ± {r.get('fd_std', nan):.1f} | "
                     f"{r.get('ratio', nan):.2f} / {r.get('ratio_net2', nan):.2f} | {r.get('precision', nan):.3f} | "
                     f"{r.get('recall', nan):.3f} ({r.get('recall_ratio', nan):.2f}) | {r.get('copies')} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
