"""Train the second, independent digits feature net (DigitsNet2) used to cross-check FD-digits and precision/recall.

    OMP_NUM_THREADS=1 python train/classifier2.py           # writes fewstep/assets/digits_net2/

Same recipe as train/classifier.py (AdamW lr 2e-3 cosine, batch 128, random shifts up to 2 px, 80/20 stratified
split), with a different architecture (fewstep.digits.metrics.DigitsNet2) and a different seed (1, which also
draws a different train / held-out split).
"""

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

from fewstep.digits.data import load_digits, stratified_split
from fewstep.digits.metrics import DIGITS_NET2_DIR, class_accuracy, save_digits_net, train_digits_net2

HOLDOUT = 0.2

CARD = """# digits_net2: the second fewstep feature network

A second small CNN classifier (`fewstep.digits.metrics.DigitsNet2`, {params:,} parameters, {dim}-d penultimate
features) for 16x16 digits in [-1, 1] (`fewstep.digits.data.load_digits(16)`, scikit-learn's 1,797 handwritten
digits), trained independently of `digits_net` to cross-check its figures: FD-digits, precision and recall
(`fewstep.digits.quality`) computed in both feature spaces should tell the same story.

It differs from `digits_net` in architecture (four GELU convolutions, a 5x5 first kernel, strided convolutions
instead of max-pooling, channels {channels}, {dim}-d features; `digits_net` has three SiLU 3x3 convolutions with
max-pooling and 64-d features) and in seed (hence initialisation, batches and train / held-out split).
Its Frechet distances are on their own scale: compare them only with other `digits_net2` figures.

- Command: `{command}`
- Seed: {seed}; steps: {steps}; batch 128; AdamW lr 2e-3 cosine; random shifts up to 2 px
- Trained on the 80% train split only (stratified, seed {seed}); held-out accuracy on the other 20%
  ({n_held} images): **{acc:.4f}**
- Wall time: {wall:.1f} s on one CPU thread; torch {torch}; date {date}

Load with `fewstep.digits.metrics.load_digits_net2()`.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DIGITS_NET2_DIR, help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed for the split, init and batches (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(1)

    x0, labels = load_digits(16)
    train_idx, held_idx = stratified_split(labels, holdout=HOLDOUT, seed=args.seed)
    t0 = time.time()
    net = train_digits_net2(x0[train_idx], labels[train_idx], steps=args.steps, seed=args.seed)
    wall = time.time() - t0
    acc = class_accuracy(x0[held_idx], labels[held_idx], net)
    print(f"held-out accuracy {acc:.4f} on {len(held_idx)} images; train wall time {wall:.1f} s")

    # the split is recorded beside the constructor arguments so that tests can re-measure the held-out accuracy
    net.config["training"] = {"seed": args.seed, "steps": args.steps, "holdout": HOLDOUT,
                              "held_out_accuracy": round(acc, 6), "wall_time_s": round(wall, 1)}
    save_digits_net(net, args.out)
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "PYTHONPATH") if k in os.environ]
    command = " ".join(env + ["python"] + sys.argv)
    cfg = net.config
    (args.out / "README.md").write_text(CARD.format(
        params=sum(q.numel() for q in net.parameters()), dim=cfg["feature_dim"], channels=tuple(cfg["channels"]),
        command=command, seed=args.seed, steps=args.steps, n_held=len(held_idx), acc=acc, wall=wall,
        torch=torch.__version__, date=datetime.date.today().isoformat()))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
