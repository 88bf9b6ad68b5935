"""Distill a diffusers teacher into a phased few-step generator with Phased DMD (arXiv 2510.27684).

One expert per phase of the student's t-list, trained from the noisiest phase down; the exported pipeline
switches experts by timestep. With no arguments it distills the bundled digits teacher into a 4-step,
4-expert student on a CPU in minutes.

Examples:
    accelerate launch train/phased_dmd.py
    accelerate launch train/phased_dmd.py --preset digits_phased_dmd_2phase   # 2 experts over [999, 499]
    accelerate launch train/phased_dmd.py --method.phase_order alternate --train.max_steps 500
    accelerate launch train/phased_dmd.py --preset wan_phased_dmd --model.teacher /path/to/wan
    python train/phased_dmd.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("phased_dmd", __doc__)
