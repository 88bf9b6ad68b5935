"""Knowledge distillation of a diffusers teacher on its own DDIM trajectories: Luhman & Luhman's Denoising Student
(arXiv 2101.02388). Noise -> teacher-sample pairs are made once into <output_dir>/kd_pairs (a killed run keeps them),
then the student regresses its output from the noise onto the teacher's sample.

With no arguments it distills the bundled digits teacher into a one-step student on a CPU in minutes.

Examples:
    accelerate launch train/kd.py
    accelerate launch train/kd.py --preset digits_kd_4step                # 4 steps: 999, 749, 499, 249
    accelerate launch train/kd.py --method.pairs 4096 --method.loss pseudo_huber
    accelerate launch train/kd.py --preset sd15_kd --model.teacher /path/to/sd15 --data.prompts prompts.txt
    python train/kd.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("kd", __doc__)
