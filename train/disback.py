"""Distill a diffusers teacher into a one- or few-step generator with DisBack (arXiv 2408.15991): DMD2 whose real
score walks a recorded degradation path (the teacher's score fitted to the initial student, snapshots stored as
LoRA deltas) back to the teacher.

With no arguments it distills the bundled digits teacher into a one-step student on a CPU in minutes.

Examples:
    accelerate launch train/disback.py
    accelerate launch train/disback.py --method.record_steps 400 --method.snapshot_every 100 --method.interval 10
    accelerate launch train/disback.py --preset sdxl_disback --model.teacher /path/to/sdxl \
        --data.prompts prompts.txt --data.images laion_images/
    python train/disback.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("disback", __doc__)
