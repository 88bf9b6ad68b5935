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
from fewstep import build
from fewstep.cli import run
from fewstep.config import ConfigError
from fewstep.methods.phased_dmd import PhasedDMD, PhasedGenerator, phase_split


def make_method(cfg, teacher):
    if cfg.model.mode != "full":
        raise ConfigError("phased DMD trains one full copy per phase; per-phase LoRA experts are not implemented: "
                          "use --model.mode full")
    P = phase_split(len(cfg.model.student_timesteps), cfg.method.phases)[-1] + 1
    student = PhasedGenerator.from_students([build.make_student(teacher, cfg.model) for _ in range(P)],
                                            cfg.method.phases)
    critic = build.make_critic(teacher, cfg.model)
    return PhasedDMD(cfg.method, teacher.denoiser, student, critic, cfg.train.max_steps,
                     build.make_head(critic, cfg.model))


if __name__ == "__main__":
    run("phased_dmd", __doc__, "train/phased_dmd.py", "digits_phased_dmd", make_method)
