"""Consistency distillation of a diffusers teacher: LCM (arXiv 2310.04378), Hyper-SD's segmented TSCD and
PCM's phased consistency (``--method.segments``, ``--method.segment_schedule``).

With no arguments it distills the bundled digits teacher into a 4-step LCM student on a CPU in minutes;
the export uses diffusers' stock LCMScheduler.

Examples:
    accelerate launch train/consistency.py
    accelerate launch train/consistency.py --preset digits_tscd                # segments 8 -> 4 (PCM sampler)
    accelerate launch train/consistency.py --method.w_min 1.5 --method.w_max 3 --train.max_steps 500
    accelerate launch train/consistency.py --preset sdxl_lcm_lora --model.teacher /path/to/sdxl
    python train/consistency.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("consistency", __doc__)
