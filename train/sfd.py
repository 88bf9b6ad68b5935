"""Distill a diffusers teacher into a one-step generator that has forgotten a class or a concept, with SFD (Score
Forgetting Distillation, arXiv 2409.11219): SiD whose samples under a forget condition are matched to the
teacher's score at an override condition, data-free.

With no arguments it distills the bundled digits teacher into a one-step student that draws a 0 when asked for a 6.

Examples:
    accelerate launch train/sfd.py
    accelerate launch train/sfd.py --method.forget_classes 6,3 --method.override_classes 0,8
    accelerate launch train/sfd.py --method.forget_classes "" --method.override_classes ""   # exactly SiD
    accelerate launch train/sfd.py --preset sd15_sfd --model.teacher /path/to/sd15 --data.prompts prompts.txt \\
        --method.forget_prompts "brad pitt|angelina jolie" --method.override_prompts "a middle aged man|a woman"
    python train/sfd.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("sfd", __doc__)
