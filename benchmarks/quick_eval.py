"""Quick digits score of exported run folders (one seed): class accuracy and FD-digits, plus the teacher's
50-step figure at the same sample count for the ratio.

    python benchmarks/quick_eval.py runs/a runs/b --samples 1000
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args()
    from fewstep.digits import DIGITS_TEACHER
    from fewstep.digits import scoring as digits_eval

    teacher = digits_eval.score(digits_eval.load_pipeline(DIGITS_TEACHER), args.samples, (0,), steps=50,
                                guidance_scale=2.0)
    out = {"teacher_50": teacher}
    print(json.dumps({"teacher_50": [teacher["accuracy"], teacher["fd_digits"]]}), flush=True)
    for run in args.runs:
        if not (run / "model_index.json").is_file():
            out[run.name] = "no export"
            continue
        s = digits_eval.score(digits_eval.load_pipeline(run), args.samples, (0,))
        out[run.name] = {**s, "ratio": s["fd_digits"] / teacher["fd_digits"]}
        print(json.dumps({run.name: [s["accuracy"], s["fd_digits"], out[run.name]["ratio"]]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
