"""Distill a diffusers teacher into a one- or few-step generator with DMD2 (arXiv 2405.14867).

With no arguments it distills the bundled digits teacher into a one-step student on a CPU in minutes.

Examples:
    accelerate launch train/dmd2.py
    accelerate launch train/dmd2.py --preset digits_dmd2_4step          # 4 steps: 999, 749, 499, 249
    accelerate launch train/dmd2.py --method.guidance_scale 3 --train.max_steps 500
    accelerate launch train/dmd2.py --preset sd15_dmd2 --model.teacher /path/to/sd15
    accelerate launch train/dmd2.py --preset sdxl_dmd2_4step --model.teacher /path/to/sdxl \
        --data.prompts prompts.txt --data.images laion_images/ --data.cache_embeddings cache/sdxl.pt
    python train/dmd2.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("dmd2", __doc__)
