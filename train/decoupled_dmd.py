"""Distill a diffusers teacher into a one- or few-step generator with Decoupled DMD (arXiv 2511.22677): DMD2
with the two parts of its guided gradient at their own noise levels, distribution matching over the whole
range and CFG augmentation only below the noise level of the student step being trained.

With no arguments it distills the bundled digits teacher into a one-step student on a CPU in minutes.

Examples:
    accelerate launch train/decoupled_dmd.py
    accelerate launch train/decoupled_dmd.py --preset digits_decoupled_dmd_4step
    accelerate launch train/decoupled_dmd.py --method.ca_range same             # exactly DMD2
    accelerate launch train/decoupled_dmd.py --preset digits_decoupled_dmd_phased   # inside Phased DMD
    accelerate launch train/decoupled_dmd.py --preset sdxl_decoupled_dmd_4step --model.teacher /path/to/sdxl
    python train/decoupled_dmd.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("decoupled_dmd", __doc__)
