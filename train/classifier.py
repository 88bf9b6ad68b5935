"""Train the bundled digits classifier (DigitsNet) used for class accuracy and FD-digits.

    OMP_NUM_THREADS=1 python train/classifier.py            # writes fewstep/assets/digits_net/
"""

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

from fewstep.digits.data import load_digits, stratified_split
from fewstep.digits.metrics import DIGITS_NET_DIR, class_accuracy, save_digits_net, train_digits_net

CARD = """# digits_net: the fewstep FD-digits feature network

A small CNN classifier (`fewstep.metrics.DigitsNet`, {params:,} parameters, 64-d penultimate features)
for 16x16 digits in [-1, 1] (`fewstep.digits.load_digits(16)`, scikit-learn's 1,797 handwritten digits).
It scores class accuracy and FD-digits (a Frechet distance in its feature space; not FID).

- Command: `{command}`
- Seed: {seed}; steps: {steps}; batch 128; AdamW lr 2e-3 cosine; random shifts up to 2 px
- Trained on the 80% train split only (stratified, seed {seed}); held-out accuracy on the other 20%
  ({n_held} images): **{acc:.4f}**
- Wall time: {wall:.1f} s on one CPU thread; torch {torch}; date {date}

Load with `fewstep.metrics.load_digits_net()`.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DIGITS_NET_DIR, help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, init and batches (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(1)

    x0, labels = load_digits(16)
    train_idx, held_idx = stratified_split(labels, holdout=0.2, seed=args.seed)
    t0 = time.time()
    net = train_digits_net(x0[train_idx], labels[train_idx], steps=args.steps, seed=args.seed)
    wall = time.time() - t0
    acc = class_accuracy(x0[held_idx], labels[held_idx], net)
    print(f"held-out accuracy {acc:.4f} on {len(held_idx)} images; train wall time {wall:.1f} s")

    save_digits_net(net, args.out)
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "PYTHONPATH") if k in os.environ]
    command = " ".join(env + ["python"] + sys.argv)
    (args.out / "README.md").write_text(CARD.format(
        params=sum(q.numel() for q in net.parameters()), command=command, seed=args.seed, steps=args.steps,
        n_held=len(held_idx), acc=acc, wall=wall, torch=torch.__version__, date=datetime.date.today().isoformat()))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
