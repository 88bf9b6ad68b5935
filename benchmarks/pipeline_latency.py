"""Batch-1 latency of an exported one-step pipeline against the bare work it has to do.

    python benchmarks/pipeline_latency.py runs/dmd2_digits            # an exported digits run folder
    python benchmarks/pipeline_latency.py runs/dmd2_digits --reps 200 --threads 1

The pipeline is loaded the way a user loads it (``DiffusionPipeline.from_pretrained(run, trust_remote_code=True)``)
and called for one image with ``output_type="np"``. The bare reference is the same backbone call on the same
input (the scheduler's input scaling and timestep included) plus the output conversion the pipeline must do
(x0 from the model output, clamp to [0, 1], to numpy). Both are timed interleaved in one process, so the ratio
does not depend on the machine's load; prints the medians, the ratio and its spread over blocks of 20 calls.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="an exported run folder (model_index.json, unet/, scheduler/)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if not (Path(args.run) / "model_index.json").is_file():
        sys.exit(f"error: {args.run!r} holds no exported pipeline (model_index.json); train one first, e.g. "
                 "accelerate launch train/dmd2.py")

    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(args.threads)
    pipe = DiffusionPipeline.from_pretrained(args.run, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    unet, sched = pipe.unet, pipe.scheduler
    size = unet.config.sample_size
    label = torch.tensor([3])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, size, size, generator=g)

    def full():
        return pipe(class_labels=[3], latents=x, output_type="np").images

    def bare():
        with torch.no_grad():
            sched.set_timesteps(1)
            t = sched.timesteps[0]
            out = unet(sched.scale_model_input(x, t), t.reshape(1), class_labels=label).sample
            x0 = sched.step(out, t, x).prev_sample
            return (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    with torch.no_grad():
        same = float(abs(full() - bare()).max())
    times = {"pipeline": [], "bare": []}
    for _ in range(10):
        full(), bare()
    for _ in range(args.reps):
        for name, fn in (("pipeline", full), ("bare", bare)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    blocks = [statistics.median(times["pipeline"][i:i + 20]) / statistics.median(times["bare"][i:i + 20])
              for i in range(0, args.reps - 19, 20)]
    report = {"run": args.run, "threads": args.threads, "reps": args.reps,
              "pipeline_ms": round(1000 * statistics.median(times["pipeline"]), 3),
              "bare_ms": round(1000 * statistics.median(times["bare"]), 3),
              "ratio": round(statistics.median(times["pipeline"]) / statistics.median(times["bare"]), 3),
              "ratio_blocks_min_max": [round(min(blocks), 3), round(max(blocks), 3)],
              "max_abs_difference_of_outputs": same, "torch": torch.__version__}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
