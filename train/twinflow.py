"""TwinFlow (Cheng et al., "TwinFlow: Realizing One-step Generation on Large Models with Self-adversarial Flows",
arXiv 2512.05150): a two-time student with time extended to [-1, 1] learns one- and few-step jumps from real samples,
RCGM consistency targets of an EMA of itself and the rectification between its real (t > 0) and fake (t < 0)
trajectories; no critic, discriminator or teacher copy is trained. Needs real samples for x_t.

With no arguments it trains a one-step student from the bundled digits teacher on a CPU.

Examples:
    accelerate launch train/twinflow.py
    accelerate launch train/twinflow.py --preset digits_twinflow_2step          # 2 steps: 999, 499
    accelerate launch train/twinflow.py --method.guidance_gamma 0.25 --method.estimate_order 1
    accelerate launch train/twinflow.py --preset sd35_twinflow --data.images imgs/
    python train/twinflow.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("twinflow", __doc__)
