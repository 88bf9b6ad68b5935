"""MeanFlow distillation of a diffusers teacher (Geng et al., "Mean Flows for One-step Generative Modeling",
arXiv 2505.13447): a two-time student learns the average velocity u(z_t, r, t) from the MeanFlow identity with the
teacher's velocity as v, and samples z_r = z_t - (t - r) u in one or a few steps. Needs real samples for z_t.

With no arguments it distills the bundled digits teacher into a one-step student on a CPU.

Examples:
    accelerate launch train/meanflow.py
    accelerate launch train/meanflow.py --preset digits_meanflow_2step          # 2 steps: 999, 499
    accelerate launch train/meanflow.py --method.ratio 0.5 --method.weight_p 0.5
    accelerate launch train/meanflow.py --model.teacher /path/to/sd15 --data.source images --data.images imgs/
    python train/meanflow.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("meanflow", __doc__)
