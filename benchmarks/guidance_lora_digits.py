"""The guidance-distilled digits teacher (one network pass per step) against the CFG teacher it distils (two passes).

``digits_guidance_lora`` fuses a LoRA that has learned the teacher's CFG at w into the teacher's UNet, so the exported
folder samples the guided distribution at ``guidance_scale=1``. This samples, at the same DDIM step count, the same
noise and labels:

- the exported guided teacher at ``guidance_scale=1`` (1 NFE per step),
- the bundled teacher at CFG w (2 NFE per step; the target),
- the bundled teacher without guidance (1 NFE per step; where the LoRA starts),

and reports for each: class accuracy, FD-digits to the real digits, FD-digits to the CFG teacher's own samples (how
far each is from the distribution being distilled), images per second (interleaved, batch 100) and NFE per image.
The share of the unguided teacher's distance to the target that the LoRA closes is ``1 - FD(lora, cfg) /
FD(unguided, cfg)``. Writes ``<out>/guidance_lora_digits.json`` and ``.md``.

    python train/guidance_lora.py                   # -> runs/guidance_lora_digits (a few minutes)
    python benchmarks/guidance_lora_digits.py runs/guidance_lora_digits --samples 1000
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the exported guidance-LoRA run folder (train/guidance_lora.py's output)")
    p.add_argument("--samples", type=int, default=1000, help="images per sampler (equal counts of the 10 classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of every sampler")
    p.add_argument("--out", type=Path, default=None, help="default: the run folder")
    args = p.parse_args()
    config = args.run / "config.json"
    if not config.is_file():
        raise SystemExit(f"error: {args.run} has no config.json; give the folder train/guidance_lora.py wrote")
    cfg = json.loads(config.read_text())
    if cfg.get("method_name") != "guidance_lora":
        raise SystemExit(f"error: {args.run} is a {cfg.get('method_name')!r} run, not a guidance_lora one")
    w = float(cfg["method"]["guidance_scale"])
    out = args.out or args.run

    from fewstep.digits import DIGITS_TEACHER, metrics, scoring

    net = metrics.load_digits_net()
    lora, teacher = scoring.load_pipeline(args.run), scoring.load_pipeline(DIGITS_TEACHER)
    samplers = {"guidance LoRA, w = 1": (lora, 1.0, 1), f"teacher, CFG {w:g}": (teacher, w, 2),
                "teacher, no guidance": (teacher, 1.0, 1)}
    images, rows = {}, {}
    for name, (pipe, scale, nfe) in samplers.items():
        t0 = time.perf_counter()
        images[name], labels = scoring.generate(pipe, args.samples, args.seed, args.steps, scale)
        rows[name] = {"guidance_scale": scale, "nfe_per_image": nfe * args.steps,
                      "generate_seconds": time.perf_counter() - t0,
                      "accuracy": metrics.class_accuracy(images[name], labels, net),
                      "fd_digits": metrics.fd_digits(images[name], net)}
        print(f"{name}: accuracy {rows[name]['accuracy']:.3f}, FD-digits {rows[name]['fd_digits']:.2f}",
              file=sys.stderr, flush=True)
    with torch.no_grad():
        target = metrics.feature_stats(net.features(images[f"teacher, CFG {w:g}"]))
    for name, row in rows.items():
        row["fd_to_cfg_teacher"] = max(0.0, metrics.fd_digits(images[name], net, reference=target))
    labels100 = (torch.arange(100) % 10).tolist()
    rates = {name: [] for name in samplers}
    for _ in range(3):          # interleaved, so a change of machine load hits every sampler alike
        for name, (pipe, scale, _) in samplers.items():
            t0 = time.perf_counter()
            pipe(labels100, num_inference_steps=args.steps, guidance_scale=scale,
                 generator=torch.Generator().manual_seed(0), output_type="pt")
            rates[name].append(100 / (time.perf_counter() - t0))
    for name, row in rows.items():
        row["images_per_s"] = statistics.median(rates[name])
    lora_row, free = rows["guidance LoRA, w = 1"], rows["teacher, no guidance"]
    closed = 1 - lora_row["fd_to_cfg_teacher"] / free["fd_to_cfg_teacher"]
    lines = [(f"Digits, {args.samples} images, seed {args.seed}, {args.steps} DDIM steps, CPU "
             f"({torch.get_num_threads()} threads); the LoRA run: {args.run}"), "",
             ("| sampler | NFE / image | class accuracy | FD-digits (to real) | FD-digits to the CFG teacher's samples | "
             "images / s |"), "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['nfe_per_image']} | {r['accuracy']:.3f} | {r['fd_digits']:.2f} | "
                     f"{r['fd_to_cfg_teacher']:.2f} | {r['images_per_s']:.2f} |")
    lines += ["", (f"The LoRA closes {closed:.0%} of the unguided teacher's distance to the CFG {w:g} teacher, at "
              f"{lora_row['images_per_s'] / rows[f'teacher, CFG {w:g}']['images_per_s']:.2f}x its speed.")]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "guidance_lora_digits.md").write_text(text + "\n")
    (out / "guidance_lora_digits.json").write_text(json.dumps(
        {"run": str(args.run), "samples": args.samples, "seed": args.seed, "steps": args.steps, "w": w,
         "rows": rows, "gap_closed": closed}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
