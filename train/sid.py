"""Distill a diffusers teacher into a one- or few-step generator with SiD (Score identity Distillation,
arXiv 2404.04057), Long-and-Short Guidance (SiD-LSG, arXiv 2406.01561) and few-step SiD (arXiv 2505.12674).

With no arguments it distills the bundled digits teacher into a one-step student on a CPU in minutes.
The generator's input is sigma(t_init) z at sigma/alpha = 2.5 (--method.sigma_init), so the student's
first timestep is t_init (755 for the digits teacher's cosine schedule, 625 for SD1.5).

Examples:
    accelerate launch train/sid.py
    accelerate launch train/sid.py --preset digits_sid_4step          # 4 steps: 755, 566, 378, 189
    accelerate launch train/sid.py --method.alpha 1.0 --train.max_steps 500
    accelerate launch train/sid.py --preset sd15_sid_lsg --model.teacher /path/to/sd15
    accelerate launch train/sid.py --preset sd15_sid_lsg --method.lsg zero_cfg
    python train/sid.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("sid", __doc__)
