"""Train the bundled class-conditional digits teacher and write fewstep/assets/digits_teacher/ whole: the
diffusers folder (unet/, scheduler/, model_index.json and the pipeline file it names) and its model card.

    OMP_NUM_THREADS=1 python train/teacher.py     # ~10 min train + a few min evaluation on one CPU core
"""

import argparse
import dataclasses
import datetime
import os
import sys
import time
from pathlib import Path

import diffusers
import torch
from fewstep_pipelines import FewStepClassPipeline

from fewstep.digits.data import load_digits
from fewstep.digits.metrics import real_floor
from fewstep.digits.teacher import (
    CARD,
    TEACHER_DIR,
    TeacherConfig,
    evaluate_teacher,
    make_sample_scheduler,
    train_teacher,
)
from fewstep.run.folders import save_pipeline_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=TEACHER_DIR, help="output directory (default: %(default)s)")
    for f in dataclasses.fields(TeacherConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"TeacherConfig.{f.name} (default: %(default)s)")
    p.add_argument("--eval-samples", type=int, default=1000, help="samples for the model card's evaluation")
    p.add_argument("--log-every", type=int, default=100, help="steps between loss reports (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = TeacherConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherConfig)})

    x0, labels = load_digits(16)
    t0 = time.time()
    unet, ddpm, history = train_teacher(x0, labels, cfg, log_every=args.log_every)
    wall = time.time() - t0
    ddim = make_sample_scheduler(ddpm)
    params = sum(q.numel() for q in unet.parameters())
    print(f"trained {cfg.steps} steps in {wall:.0f} s; final loss {history[-1][1]:.4f}; {params:,} parameters")

    evaluation = evaluate_teacher(unet, ddim, args.eval_samples, seed=cfg.seed)
    print(evaluation)
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "PYTHONPATH") if k in os.environ]
    card = CARD.format(
        **dataclasses.asdict(cfg), **evaluation, params=params, command=" ".join(env + ["python"] + sys.argv),
        log_every=args.log_every, final_loss=history[-1][1], wall=wall, torch=torch.__version__,
        diffusers=diffusers.__version__, date=datetime.date.today().isoformat(),
        per_class=args.eval_samples // 10, floor=real_floor()[0])
    # the whole folder, as any exported student: loads with DiffusionPipeline.from_pretrained(trust_remote_code)
    save_pipeline_dir(FewStepClassPipeline(unet=unet, scheduler=ddim), args.out, model_card=card, overwrite=True)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
