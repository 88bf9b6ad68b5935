"""What a training step costs, against the network passes it makes, for every method on a tiny SD1.5 pipeline.

    python benchmarks/step_cost.py                       # CPU, one thread, every config
    python benchmarks/step_cost.py --configs dmd2 dmd2_gan --steps 40

The pipeline is the one peers are compared on: UNet2DConditionModel with channels (32, 64), cross-attention 32,
sample 16 (4x16x16 latents), a tiny CLIP text encoder; batch 4, teacher CFG 1.75, a one-step student at t = 999,
TTUR 5, no gradient checkpointing. A step is what the training loop runs (``loop._Turns``: the turns due, their
backward, clipping, the optimizer, the EMA), timed over whole TTUR cycles after warm-up. Each step's network
passes are recorded by hooks (network, batch size, what it differentiates: nothing, parameters or input, and
whether it stopped at the tapped block); each kind of pass is then timed alone (forward, plus the backward of
its output's sum when it differentiates), and

    overhead = step time / sum over the step's passes of their time alone

so 1.00 means the step is nothing but its network passes. Prints a JSON report and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CFG_SCALE, TTUR, BATCH = 1.75, 5, 4
# config name -> (method, preset it starts from, method fields, model fields)
CONFIGS = {
    "dmd2": ("dmd2", "sd15_dmd2", {"gan_weight_student": 0.0}, {"gan_head": False}),
    "dmd2_gan": ("dmd2", "sd15_dmd2", {"gan_weight_student": 1e-2}, {"gan_head": True}),
    "dmd2_gan_teacher": ("dmd2", "sd15_dmd2", {"gan_weight_student": 1e-2, "gan_features": "teacher"},
                         {"gan_head": True}),
    "fdistill": ("fdistill", "sd15_fdistill", {}, {"gan_head": True}),
    "sid": ("sid", "sd15_sid_lsg", {}, {"gan_head": False}),
    "lcm": ("consistency", "sd15_lcm", {}, {}),
}


def tiny_sd15(folder: Path) -> Path:
    """The benchmark's SD1.5-style teacher, saved as a diffusers folder."""
    import tiny_models
    import torch
    from diffusers import UNet2DConditionModel

    pipe = tiny_models.sd15()
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                     cross_attention_dim=32).eval()
    pipe.save_pretrained(folder)
    return folder


def data_files(folder: Path) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of thing {i}" for i in range(16)) + "\n")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return prompts, images


def setup(name: str, teacher: Path, prompts: Path, images: Path, out: Path, device: str):
    from fewstep.run import build
    from fewstep.run.presets import PRESETS

    method_name, preset, method_fields, model_fields = CONFIGS[name]
    cfg = PRESETS[method_name][preset]()
    cfg.model.teacher, cfg.model.teacher_dtype, cfg.model.mode = str(teacher), "float32", "full"
    cfg.model.gradient_checkpointing = False
    for k, v in model_fields.items():
        setattr(cfg.model, k, v)
    if method_name in ("dmd2", "fdistill"):     # SiD keeps its t_init input, LCM its multi-step list
        cfg.model.student_timesteps = (999,)
    for k, v in {"guidance_scale": CFG_SCALE, "student_every": TTUR, **method_fields}.items():
        if hasattr(cfg.method, k):
            setattr(cfg.method, k, v)
    cfg.data.prompts, cfg.data.images, cfg.data.batch_size, cfg.data.resolution = str(prompts), str(images), BATCH, 32
    cfg.train.output_dir, cfg.train.mixed_precision, cfg.train.grad_accum = str(out), "no", 1
    teacher_ = build.load_teacher(cfg.model)
    method = build.make_method(cfg, teacher_).to(device)
    return cfg, method, build.make_source(cfg, teacher_)


class Passes:
    """Forward hooks on every distinct backbone of a method: each call's (network, batch, grad, stopped)."""

    def __init__(self, method):
        import torch

        self.log, self.handles, self.models = [], [], {}
        for letter, attr in (("teacher", "teacher"), ("critic", "critic"), ("student", "student"),
                             ("target", "target")):
            d = getattr(method, attr, None)
            d = getattr(d, "denoiser", d)
            if d is None or any(m is d.backbone.model for m in self.models.values()):
                continue
            model = self.models[letter] = d.backbone.model

            def pre(mod, args, kwargs, letter=letter):
                x = args[0] if args else kwargs["sample"]
                grad = "none"
                if torch.is_grad_enabled():
                    grad = "params" if any(p.requires_grad for p in mod.parameters()) else \
                        "input" if x.requires_grad else "none"
                self.log.append([letter, x.shape[0], grad, True])

            self.handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
            out = getattr(model, "conv_out", None) or model.proj_out
            self.handles.append(out.register_forward_hook(lambda *_: self.log[-1].__setitem__(3, False)))

    def remove(self):
        for h in self.handles:
            h.remove()


def time_pass(method, source, kind, device, reps: int) -> float:
    """Milliseconds of one pass of ``kind`` = (network, batch, grad, stopped) run alone (median of ``reps``)."""
    import torch

    net, b, grad, stopped = kind
    d = {"teacher": method.teacher, "critic": getattr(method, "critic", None),
         "student": method.student.denoiser, "target": getattr(method, "target", None)}[net]
    batch = source.batch(0, 0).to(device)
    cond = batch.cond if b == len(batch.noise) else type(batch.cond).cat(batch.cond, batch.uncond)
    x = torch.randn(b, *batch.noise.shape[1:], device=device)
    t = torch.full((b,), 0.5, device=device)
    params = [p for p in d.backbone.model.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(grad == "params")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    try:
        for _ in range(reps + 2):
            xi = x.clone().requires_grad_(grad == "input")
            sync()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(grad != "none"):
                out = d.features(xi, t, cond)[-1] if stopped else d(xi, t, cond)
                if grad != "none":
                    out.float().sum().backward()
            sync()
            times.append(time.perf_counter() - t0)
            d.backbone.model.zero_grad(set_to_none=True)
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
    return 1000 * statistics.median(times[2:])


def measure(name, teacher, prompts, images, work, device, steps, warmup):
    import torch

    from fewstep.core.ema import EMA
    from fewstep.run import build
    from fewstep.training import loop, optim

    cfg, method, source = setup(name, teacher, prompts, images, work / name, device)
    acc = build.accelerator("no", str(work / name))
    params = method.trainable()
    opts = {t.name: optim.build(params[t.name], cfg.optim[t.name]) for t in method.turns}
    ema = EMA(params["student"], cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    turns = loop._Turns(cfg, method, method, params, opts, ema, acc)
    every = max(t.every for t in method.turns)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    passes = Passes(method)
    cycle, kinds, n = [], {}, 0
    total = warmup + steps
    total += -total % every               # whole TTUR cycles, so the mean holds the turns in their ratio
    for step in range(total):
        passes.log.clear()
        sync()
        t0 = time.perf_counter()
        for ti, turn in enumerate(method.turns):
            if step % turn.every == 0:
                turns.run(turn, ti, step, source, 0, work / name / "ckpt")
        sync()
        if step >= total - steps - (-steps % every):
            cycle.append(time.perf_counter() - t0)
            n += 1
            for k in passes.log:
                kinds[tuple(k)] = kinds.get(tuple(k), 0) + 1
    passes.remove()
    step_ms = 1000 * sum(cycle) / len(cycle)
    pass_ms = {k: time_pass(method, source, k, device, reps=10) for k in kinds}
    network_ms = sum(pass_ms[k] * c for k, c in kinds.items()) / n
    return {"config": name, "method": cfg.method_name, "ms_per_step": round(step_ms, 2),
            "network_ms_per_step": round(network_ms, 2), "overhead": round(step_ms / network_ms, 3),
            "passes_per_step": {"/".join(map(str, k)): {"count": round(c / n, 2), "ms": round(pass_ms[k], 2)}
                                for k, c in sorted(kinds.items())}, "steps": n}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (the comparison uses 1)")
    p.add_argument("--steps", type=int, default=40, help="timed steps (rounded up to whole TTUR cycles)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default="", help="also write the JSON report here")
    args = p.parse_args()

    import os

    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = tiny_sd15(work / "teacher")
        prompts, images = data_files(work)
        rows = []
        for name in args.configs:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            rows.append(measure(name, teacher, prompts, images, work, args.device, args.steps, args.warmup))
    report = {"machine": {"device": args.device, "threads": args.threads if args.device == "cpu" else None,
                          "load_1min": os.getloadavg()[0], "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
              "command": " ".join(sys.argv), "rows": rows}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("\n| config | ms/step | network ms/step | overhead | passes per step (network/batch/grad/stopped: count x ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ps = "; ".join(f"{k}: {v['count']} x {v['ms']}" for k, v in r["passes_per_step"].items())
        print(f"| {r['config']} | {r['ms_per_step']} | {r['network_ms_per_step']} | {r['overhead']} | {ps} |")


if __name__ == "__main__":
    main()
