"""Multi-Student Distillation (Song et al., "Multi-student Diffusion Distillation for Better One-step Generators",
arXiv 2410.23274), same-size students: the conditions are shared out among K students, each distilled with DMD2 on
its own classes or prompt cluster (its own critic, the one teacher); the export routes each class or prompt to its
student in one diffusers pipeline.

With no arguments it distills the bundled digits teacher into two one-step students (digits 0-4 and 5-9) on a CPU.

Examples:
    accelerate launch train/msd.py
    accelerate launch train/msd.py --method.students 5 --method.class_groups "0,1|2,3|4,5|6,7|8,9"
    accelerate launch train/msd.py --preset sd15_msd --model.teacher /path/to/sd15 --data.prompts prompts.txt
    python train/msd.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("msd", __doc__)
