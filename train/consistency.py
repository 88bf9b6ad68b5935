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
from fewstep import build
from fewstep.cli import run
from fewstep.methods.consistency import Consistency, with_w_condition


def make_method(cfg, teacher):
    student = build.make_student(teacher, cfg.model)
    if cfg.method.w_embedding:
        with_w_condition(student.denoiser, cfg.method.w_embedding_dim)
    method = Consistency(cfg.method, teacher.denoiser, student, cfg.train.max_steps)
    method.export_scheduler(teacher.scheduler_config, cfg.model.student_timesteps)   # fail before training
    return method


if __name__ == "__main__":
    run("consistency", __doc__, "train/consistency.py", "digits_consistency", make_method)
