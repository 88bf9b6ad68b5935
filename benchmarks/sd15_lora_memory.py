"""Peak memory and time of one DMD2 training step (critic turn + student turn, AdamW) on an
SD1.5-architecture UNet with random weights, in ``full`` vs ``lora`` mode.

    python benchmarks/sd15_lora_memory.py --device cpu --batch 1            # both modes, one subprocess each
    python benchmarks/sd15_lora_memory.py --device cuda --batch 4 --steps 5 # GPU: bf16 autocast, CUDA peak

Each mode runs in its own process so its peak (CPU: ru_maxrss; CUDA: max_memory_allocated) is its own.
``--limit-gb`` caps a CPU child's address space so a mode that does not fit fails cleanly instead of
waking the OOM killer; the report then says "more than LIMIT".
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(mode: str, device: str, rank: int, tiny: bool, dtype, checkpointing: bool = False):
    import torch
    from diffusers import UNet2DConditionModel

    from fewstep.backbones import adapter_for
    from fewstep.core.denoiser import Denoiser
    from fewstep.core.schedules import VPDiscrete
    from fewstep.methods.dmd2 import DMD2, DMD2Config
    from fewstep.run import build as B
    from fewstep.run.config import ModelConfig

    torch.manual_seed(0)
    small = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, layers_per_block=1) if tiny else {}
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, **small)   # SD1.5 architecture: 860M
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if checkpointing:     # what --model.gradient_checkpointing true does; the copies below inherit it
        from fewstep.backbones import options as backbone_options

        backbone_options.apply(unet, ModelConfig(gradient_checkpointing=True))
    sched = {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    teacher = B.Teacher(Denoiser(adapter_for(unet, "epsilon"), VPDiscrete.from_betas(**{k: v for k, v in sched.items()
                        if k.startswith("beta") or k == "num_train_timesteps"})), Path("."), "unet", sched)
    cfg = ModelConfig(mode=mode, lora_rank=rank, student_timesteps=(999,), gan_head=False)
    student, critic = B.make_student(teacher, cfg), B.make_critic(teacher, cfg)
    method = DMD2(DMD2Config(guidance_scale=1.75, student_every=1), teacher.denoiser, student, critic).to(device)
    return method


def batch(n: int, device: str):
    import torch

    from fewstep.core.conditioning import Batch, Cond

    g = torch.Generator().manual_seed(0)
    text = torch.randn(n, 77, 768, generator=g)
    return Batch(noise=torch.randn(n, 4, 64, 64, generator=g), cond=Cond(text=text),
                 uncond=Cond(text=torch.zeros_like(text)), seeds=torch.arange(n)).to(device)


def one_mode(args) -> dict:
    import torch

    from fewstep.run.config import OptimConfig
    from fewstep.training import loop, optim

    torch.set_num_threads(max(1, args.threads))
    bf16 = args.device == "cuda"     # bf16 autocast is slow on CPU: measure CPU memory in fp32
    dtype = torch.bfloat16 if bf16 else torch.float32
    method = build(args.mode, args.device, args.rank, args.tiny, dtype, args.gradient_checkpointing)
    params = method.trainable()
    opts = {k: optim.build(v, OptimConfig(lr=1e-5))[0] for k, v in params.items()}
    b = batch(args.batch, args.device)
    cuda = args.device == "cuda"

    def step(i):
        for turn in ("critic", "student"):          # both turns of a DMD2 step, as on step 0
            loop._set_turn(params, turn)
            opts[turn].zero_grad(set_to_none=True)
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = method(turn, b, i)
            loss.backward()
            opts[turn].step()
            opts[turn].zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    times = []
    for i in range(args.steps + 1):                 # the first step is the warm-up
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n_train = sum(p.numel() for ps in params.values() for p in ps)
    return {"mode": args.mode, "device": args.device, "batch": args.batch, "peak_gib": peak,
            "gradient_checkpointing": args.gradient_checkpointing,
            "step_s_median": statistics.median(times[1:]) if len(times) > 1 else times[0], "step_s_all": times,
            "trainable_params": n_train, "total_params": sum(p.numel() for p in method.parameters())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["full", "lora", "both"], default="both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (DMD2 SDXL LoRA: 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-gb", type=float, default=22.0, help="CPU address-space cap per mode")
    p.add_argument("--json", default="")
    p.add_argument("--tiny", action="store_true", help="a small UNet, to check the script quickly")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations in backward "
                   "(both modes), as --model.gradient_checkpointing true does")
    args = p.parse_args()
    if args.mode != "both":
        print(json.dumps(one_mode(args)))
        return
    rows = []
    for mode in ("lora", "full"):
        rest = [a for i, a in enumerate(sys.argv[1:]) if a != "--mode" and (i == 0 or sys.argv[i] != "--mode")]
        cmd = [sys.executable, __file__, *rest, "--mode", mode]
        limit = None if args.device == "cuda" else int(args.limit_gb * 2**30)
        pre = (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))) if limit else None
        r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pre)
        if r.returncode == 0:
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        else:
            rows.append({"mode": mode, "device": args.device, "failed": r.stderr.strip().splitlines()[-1][:300],
                         "peak_gib": f"> {args.limit_gb}" if limit else "failed"})
    by = {r["mode"]: r for r in rows}
    if all(isinstance(by[m].get("peak_gib"), float) for m in ("lora", "full")):
        ratio = by["lora"]["peak_gib"] / by["full"]["peak_gib"]
    elif isinstance(by["lora"].get("peak_gib"), float):
        ratio = f"< {by['lora']['peak_gib'] / args.limit_gb:.3f} (full mode exceeded {args.limit_gb} GiB)"
    else:
        ratio = None
    report = {"rows": rows, "lora_over_full_peak": ratio}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
