"""Time the main job's DMD2 training steps (preset digits_dmd2, bundled teacher) on one device.

    python benchmarks/step_time.py --device cuda --precision bf16 --steps 100

Reports the median time of a critic-only step and of a step with both turns (critic + student, the
two time-scale update of the preset), after warm-up; batches come from the preset's own source.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=0, help="override the preset's batch size")
    args = p.parse_args()

    import torch

    from fewstep.run import build, presets
    from fewstep.training import loop, optim

    if args.device == "cpu":
        torch.set_num_threads(1)
    cfg = presets.digits_dmd2()
    if args.batch:
        cfg.data.batch_size = args.batch
    teacher = build.load_teacher(cfg.model)
    source = build.make_source(cfg, teacher)
    torch.manual_seed(0)
    method = build.make_method(cfg, teacher).to(args.device)
    params = method.trainable()
    opts = {t.name: optim.build(params[t.name], cfg.optim[t.name])[0] for t in method.turns}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = {"critic_only": [], "critic_and_student": []}
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        ran = []
        for ti, turn in enumerate(method.turns):
            if step % turn.every:
                continue
            loop._set_turn(params, turn.name)
            batch = source.batch(step, ti).to(args.device)
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss, _ = method(turn.name, batch, step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params[turn.name], cfg.train.max_grad_norm)
            opts[turn.name].step()
            opts[turn.name].zero_grad(set_to_none=True)
            ran.append(turn.name)
        sync()
        if step >= args.warmup:
            times["critic_and_student" if "student" in ran else "critic_only"].append(time.perf_counter() - t0)
    out = {k: {"median_ms": 1000 * statistics.median(v), "n": len(v)} for k, v in times.items() if v}
    every = cfg.method.student_every
    out["mean_ms_per_step"] = (out["critic_only"]["median_ms"] * (every - 1) + out["critic_and_student"]["median_ms"]) / every
    out.update(device=args.device, precision=args.precision, batch=cfg.data.batch_size,
               gpu=torch.cuda.get_device_name() if args.device == "cuda" else None, torch=torch.__version__)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
