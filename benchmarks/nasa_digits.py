"""NASA on the digits text-to-image student: does a negative prompt naming digit d lower the share of d?

SNOOPI (arXiv 2412.02687) steers one-step students away from a negative prompt inside every cross-attention
layer (Z+ - alpha Z-, ``nasa_fewstep.py``). This script loads an exported digits text-to-image student folder
with plain diffusers (``IFPipeline``), generates ``--samples`` images for a prompt that allows every digit ("a
handwritten digit"), first without NASA, then with the negative prompt "a handwritten <d>" at each alpha, all
from the same noise (image i from seed ``seed * 10^6 + i``), classifies them with the bundled DigitsNet and
reports, per setting, the share of d (with its binomial standard error), the share of every digit, and
FD-digits against the real digits (a quality check: steering should not wreck the images).

    python benchmarks/nasa_digits.py runs/dmd2_digits_t2i --digit 3 --alphas 0.25,0.5,1.0 --samples 1000

NASA comes from the folder's own ``nasa_fewstep.py`` (what a user of the export runs); a folder exported before
the file was added falls back to the installed ``fewstep_pipelines.nasa_fewstep``, and the report says which.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def nasa_module(folder: Path):
    """(module, where it came from): the folder's ``nasa_fewstep.py``, else the installed one."""
    file = folder / "nasa_fewstep.py"
    if not file.is_file():
        from fewstep_pipelines import nasa_fewstep

        return nasa_fewstep, "fewstep_pipelines (the folder has no nasa_fewstep.py)"
    spec = importlib.util.spec_from_file_location("nasa_fewstep_from_folder", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, str(file)


def student_steps(folder: Path) -> int:
    """The student's step count from ``generator_config.json`` (written by every fewstep export)."""
    cfg = folder / "generator_config.json"
    if not cfg.is_file():
        raise SystemExit(f"error: {folder} has no generator_config.json; pass --steps")
    return len(json.loads(cfg.read_text())["sampling"]["timesteps"])


def measure(x, digit: int, net, reference) -> dict:
    """Share of ``digit`` among the classifier's labels of ``x`` (and of every digit), FD-digits."""
    import torch

    from fewstep.digits import metrics

    n = len(x)
    shares = [metrics.class_accuracy(x, torch.full((n,), k), net) for k in range(10)]
    p = shares[digit]
    return {"share": p, "share_stderr": math.sqrt(p * (1 - p) / n), "shares": [round(s, 4) for s in shares],
            "fd_digits": metrics.fd_digits(x, net, reference=reference), "num_samples": n}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="an exported digits text-to-image student (IFPipeline folder)")
    p.add_argument("--digit", default="3", help="the digit d the negative prompt names (0-9 or a word)")
    p.add_argument("--alphas", default="0.25,0.5,1.0", help="comma-separated NASA strengths alpha")
    p.add_argument("--samples", type=int, default=500, help="images per setting (the issue asks for >= 500)")
    p.add_argument("--prompt", default="a handwritten digit", help="the positive prompt (must allow every digit)")
    p.add_argument("--negative", default="a handwritten {w}", help="negative prompt template ({w}: word, {n}: numeral)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the student's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)

    from fewstep.digits import metrics
    from fewstep.digits import t2i as D

    digit = D.digit_index(args.digit)
    negative = D.make_prompt(args.negative, digit)
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    steps = args.steps or student_steps(args.folder)
    nasa, source = nasa_module(args.folder)
    pipe = D.load_pipeline(args.folder)
    net, texts = metrics.load_digits_net(), [args.prompt] * args.samples
    reference = metrics.real_stats(net)

    t0 = time.time()
    report = {"folder": str(args.folder), "prompt": args.prompt, "negative_prompt": negative, "digit": digit,
              "steps": steps, "seed": args.seed, "nasa_file": source, "settings": {}}
    report["settings"]["stock"] = measure(D.generate(pipe, texts, args.seed, steps), digit, net, reference)
    for alpha in alphas:
        with nasa.nasa(pipe, negative_prompt=negative, nasa_alpha=alpha):
            x = D.generate(pipe, texts, args.seed, steps)
        report["settings"][f"nasa alpha={alpha:g}"] = measure(x, digit, net, reference)
    report["wall_s"] = round(time.time() - t0, 1)

    print(f"{args.samples} images of {args.prompt!r}, {steps} step(s); negative prompt {negative!r} (NASA from "
          f"{source})\n\n| setting | share of {digit} | +- | FD-digits | shares 0-9 |\n|---|---|---|---|---|")
    for name, r in report["settings"].items():
        print(f"| {name} | {r['share']:.3f} | {r['share_stderr']:.3f} | {r['fd_digits']:.2f} | "
              f"{' '.join(f'{s:.2f}' for s in r['shares'])} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
