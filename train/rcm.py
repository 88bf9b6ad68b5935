"""rCM score-regularized continuous-time consistency distillation of a diffusers teacher (Zheng et al., arXiv
2510.08431): sCM's consistency loss plus 0.01 x DMD2's distribution-matching term, with DMD2's critic (fake score)
and two time-scale update. Needs real samples for the sCM term's x_t.

With no arguments it distills the bundled digits teacher into a one-step student on a CPU.

Examples:
    accelerate launch train/rcm.py
    accelerate launch train/rcm.py --method.dmd_weight 0.05 --method.student_every 10
    accelerate launch train/rcm.py --model.student_timesteps 999,749,499,249      # 4 steps, backward simulation
    accelerate launch train/rcm.py --model.teacher /path/to/sd15 --data.source images --data.images imgs/
    python train/rcm.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("rcm", __doc__)
