"""Distill a diffusers teacher into a one-step generator with SwiftBrush (variational score distillation, arXiv
2312.05239): image-free, a critic ("LoRA teacher") tracks the student's samples, classifier-free guidance on both
teacher and critic; with method.guidance_min < method.guidance_max, SNOOPI's PG-SB (arXiv 2412.02687) draws the
guidance scale per step.

With no arguments it distills the bundled digits teacher into a one-step student on a CPU in minutes.

Examples:
    accelerate launch train/swiftbrush.py
    accelerate launch train/swiftbrush.py --method.guidance_min 1 --method.guidance_max 1    # fixed scale
    accelerate launch train/swiftbrush.py --preset sd21_swiftbrush --model.teacher /path/to/sd21-base \\
        --data.prompts prompts.txt
    accelerate launch train/swiftbrush.py --preset sd15_pgsb --model.teacher /path/to/sd15 --data.prompts prompts.txt
    python train/swiftbrush.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("swiftbrush", __doc__)
