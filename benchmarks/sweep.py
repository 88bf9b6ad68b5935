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
                    mm = json.loads(m.read_text())
                    row.update(acc=mm["student"]["accuracy"], fd=mm["student"]["fd_digits"],
                               fd_std=mm["student"]["fd_digits_std"], ratio=mm["fd_ratio_to_teacher"],
                               ratio_1step=mm["fd_ratio_to_teacher_one_step"], updates=mm["updates"])
                done.append(row)
                print(json.dumps(row), flush=True)
        time.sleep(1)
    (args.out / "sweep.json").write_text(json.dumps(done, indent=2))
    lines = ["| run | overrides | acc | FD-digits | ratio to teacher 50-step | wall s |", "|---|---|---|---|---|---|"]
    for r in done:
        lines.append(f"| {r['name']} | `{r['overrides']}` | {r.get('acc', float('nan')):.3f} | "
                     f"{r.get('fd', float('nan')):.1f} ± {r.get('fd_std', float('nan')):.1f} | "
                     f"{r.get('ratio', float('nan')):.3f} | {r['wall_s']:.0f} |")
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
