"""Named presets: functions returning a full RunConfig (torchtitan / EDM2 ``config_presets`` style).

The digits presets run on a laptop CPU in minutes with the bundled teacher; the hyperparameters of
real-model presets follow the papers (see ../shared/reference/dmd_family.md).
"""
from __future__ import annotations

from .config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from .methods.dmd2 import DMD2Config


def digits_dmd2() -> RunConfig:
    """DMD2 on the bundled digits teacher -> a one-step student (the main job; CPU, minutes)."""
    return RunConfig(
        method_name="dmd2",
        method=DMD2Config(guidance_scale=2.0, student_every=5, gan_weight_student=3e-3, gan_weight_critic=1e-2),
        model=ModelConfig(student_timesteps=(999,), gan_head=True),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/dmd2_digits", max_steps=1500, ema_decay=0.99, sample_every=250,
                          checkpoint_every=250),
        optim={"student": OptimConfig(lr=1e-4), "critic": OptimConfig(lr=1e-4)},
    )


def digits_dmd2_4step() -> RunConfig:
    """DMD2, 4-step student on t-list [999, 749, 499, 249] with backward simulation."""
    cfg = digits_dmd2()
    cfg.model.student_timesteps = (999, 749, 499, 249)
    cfg.train.output_dir = "runs/dmd2_digits_4step"
    return cfg


def sd15_dmd2() -> RunConfig:
    """DMD2 SD1.5 -> one step (DMD2 paper: lr 1e-5, TTUR 10, real CFG 1.75, batch 32 per GPU)."""
    return RunConfig(
        method_name="dmd2",
        method=DMD2Config(guidance_scale=1.75, student_every=10, gan_weight_student=1e-3, gan_weight_critic=1e-2),
        model=ModelConfig(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", student_timesteps=(999,),
                          teacher_dtype="bfloat16", gan_head=False),
        data=DataConfig(source="prompts", batch_size=32, prompts="data/prompts.txt"),
        train=TrainConfig(output_dir="runs/sd15_dmd2", max_steps=40_000, ema_decay=0.0, mixed_precision="bf16",
                          sample_every=1000, checkpoint_every=1000),
        optim={"student": OptimConfig(lr=1e-5, warmup_steps=500), "critic": OptimConfig(lr=1e-5, warmup_steps=500)},
    )


PRESETS = {
    "dmd2": {"digits_dmd2": digits_dmd2, "digits_dmd2_4step": digits_dmd2_4step, "sd15_dmd2": sd15_dmd2},
}
