"""Score Forgetting Distillation on digits: is the forgotten class generated as its override, and are the others kept?

    python benchmarks/sfd_forget.py runs/sfd_digits --samples 1000 [--compare runs/sid_digits]

Loads an exported SFD student (``train/sfd.py``; its forget / override classes are read from the run's
``config.json``), generates ``--samples`` images of every class (image i of class c from seed ``c * 10^6 + i``),
classifies them with the bundled digits net and reports, per forget class, the share classified as its override
(issue target: >= 95%) and, over the other classes, the class accuracy (target: >= 0.95). With ``--compare`` (a
plain SiD run folder) it also divides each kept class's FD-digits in the run's ``metrics.json`` (``per_class_fd``)
by the comparison run's (target: within 10%). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="an exported SFD run folder")
    p.add_argument("--samples", type=int, default=1000, help="images per class")
    p.add_argument("--compare", type=Path, help="a plain SiD run folder (its metrics.json's per-class FD)")
    args = p.parse_args(argv)
    from fewstep.digits import metrics, scoring

    method = json.loads((args.folder / "config.json").read_text())["method"]
    forget = dict(zip(method["forget_classes"], method["override_classes"]))
    pipe, net = scoring.load_pipeline(args.folder), metrics.load_digits_net()
    out = {"folder": str(args.folder), "samples_per_class": args.samples, "forget": {}, "kept_accuracy": None}
    hits = total = 0
    for c in range(10):
        gens = [torch.Generator().manual_seed(c * 1_000_000 + i) for i in range(args.samples)]
        with torch.no_grad():
            x = pipe([c] * args.samples, generator=gens, output_type="pt").images * 2 - 1
        pred = metrics.predicted_classes(x, net)
        if c in forget:
            shares = torch.bincount(pred, minlength=10).float() / args.samples
            out["forget"][c] = {"override": forget[c], "share_as_override": shares[forget[c]].item(),
                                "share_as_itself": shares[c].item(), "shares": [round(v, 4) for v in shares.tolist()]}
        else:
            hits, total = hits + (pred == c).sum().item(), total + args.samples
    out["kept_accuracy"] = hits / total
    if args.compare:
        mine = json.loads((args.folder / "metrics.json").read_text())["student"]["per_class_fd"]
        theirs = json.loads((args.compare / "metrics.json").read_text())["student"]["per_class_fd"]
        out["kept_fd_ratio_to_compare"] = {c: mine[c] / theirs[c] for c in mine if int(c) not in forget}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
