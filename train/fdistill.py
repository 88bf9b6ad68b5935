"""Distill a diffusers teacher into a one- or few-step generator with f-distill (f-divergence distribution
matching, arXiv 2502.15681): DMD2's gradient weighted per sample by h(r), r the discriminator's density ratio.

With no arguments it distills the bundled digits teacher into a one-step student on a CPU in minutes.

Examples:
    accelerate launch train/fdistill.py
    accelerate launch train/fdistill.py --method.divergence forward_kl
    accelerate launch train/fdistill.py --method.divergence reverse_kl     # exactly DMD2
    accelerate launch train/fdistill.py --preset sd15_fdistill --model.teacher /path/to/sd15
    python train/fdistill.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("fdistill", __doc__)
