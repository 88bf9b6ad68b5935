"""sCM continuous-time consistency distillation of a diffusers teacher (Lu & Song, "Simplifying, Stabilizing and
Scaling Continuous-Time Consistency Models", arXiv 2410.11081): the teacher's VP or flow process seen exactly in
TrigFlow, the consistency loss with the tangent df/dt by forward-mode JVP along the teacher's PF-ODE, tangent
normalisation and warm-up, adaptive weighting. Needs real samples for x_t; the student samples as x0 then re-noise.

With no arguments it distills the bundled digits teacher into a one-step student on a CPU.

Examples:
    accelerate launch train/scm.py
    accelerate launch train/scm.py --preset digits_scm_2step                  # 2 steps: 999, 499
    accelerate launch train/scm.py --method.p_mean -0.8 --method.p_std 1.6 --method.tangent_warmup 10000
    accelerate launch train/scm.py --model.teacher /path/to/sd15 --data.source images --data.images imgs/
    python train/scm.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("scm", __doc__)
