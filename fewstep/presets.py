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


def _digits_schedule():
    """The bundled digits teacher's process (cosine betas, 1000 steps), to place SiD's t_init."""
    from .schedules import VPDiscrete

    return VPDiscrete.from_betas(1000, beta_schedule="squaredcos_cap_v2")


def digits_sid() -> RunConfig:
    """SiD on the bundled digits teacher -> a one-step student whose input is sigma(t_init) z at
    sigma/alpha = 2.5 (t_init = 755 on the cosine schedule); one critic and one generator update per step."""
    from .methods.sid import SiDConfig, sid_timesteps

    return RunConfig(
        method_name="sid",
        method=SiDConfig(alpha=1.2, kappa_1=1.0, kappa_2=1.0, kappa_3=1.0, kappa_4=2.0),
        model=ModelConfig(student_timesteps=sid_timesteps(_digits_schedule(), 2.5), gan_head=False),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/sid_digits", max_steps=600, ema_decay=0.99, sample_every=200,
                          checkpoint_every=200),
        optim={"student": OptimConfig(lr=1e-4, beta1=0.0, weight_decay=0.0),
               "critic": OptimConfig(lr=1e-4, beta1=0.0, weight_decay=0.0)},
    )


def digits_sid_4step() -> RunConfig:
    """Few-step SiD, 4 steps on Few-step SiD's grid t_i = t_init (1 - i/4): [755, 566, 378, 189]."""
    from .methods.sid import sid_timesteps

    cfg = digits_sid()
    cfg.model.student_timesteps = sid_timesteps(_digits_schedule(), 2.5, 4)
    cfg.train.output_dir = "runs/sid_digits_4step"
    return cfg


def sd15_sid_lsg() -> RunConfig:
    """SiD-LSG SD1.5 -> one step (arXiv 2406.01561, run_sid.sh): alpha 1, t_init 625, t in [20, 980],
    Adam(0, 0.999) lr 1e-6 for both networks, fp32, global batch 512 (8 GPUs x 4 x 16 accumulation),
    10 Mimg (~20k steps), EMA half-life 0.05 Mimg (~100 updates); kappa 1.5 everywhere (best FID 8.15; the
    shipped script uses 2)."""
    from .methods.sid import SiDConfig

    return RunConfig(
        method_name="sid",
        method=SiDConfig(alpha=1.0, t_min=0.02, t_max=0.98, critic_t_min=0.02, critic_t_max=0.98,
                         kappa_1=1.5, kappa_2=1.5, kappa_3=1.5, kappa_4=1.5),
        model=ModelConfig(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", student_timesteps=(625,),
                          teacher_dtype="float32", gan_head=False),
        data=DataConfig(source="prompts", batch_size=4, prompts="data/prompts.txt"),
        train=TrainConfig(output_dir="runs/sd15_sid_lsg", max_steps=20_000, grad_accum=16, ema_decay=0.9931,
                          max_grad_norm=1e9, sample_every=500, checkpoint_every=500),
        optim={"student": OptimConfig(lr=1e-6, beta1=0.0, weight_decay=0.0),
               "critic": OptimConfig(lr=1e-6, beta1=0.0, weight_decay=0.0)},
    )


def digits_fdistill() -> RunConfig:
    """f-distill (Jensen-Shannon) on the bundled digits teacher -> a one-step student: DMD2's setup with
    the discriminator's density ratio weighting the DM gradient."""
    from .methods.fdistill import FDistillConfig

    return RunConfig(
        method_name="fdistill",
        method=FDistillConfig(guidance_scale=2.0, student_every=5, gan_weight_student=3e-3, gan_weight_critic=1e-2,
                              divergence="js"),
        model=ModelConfig(student_timesteps=(999,), gan_head=True),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/fdistill_digits", max_steps=1500, ema_decay=0.99, sample_every=250,
                          checkpoint_every=250),
        optim={"student": OptimConfig(lr=1e-4), "critic": OptimConfig(lr=1e-4)},
    )


def sd15_fdistill() -> RunConfig:
    """f-distill SD1.5 -> one step (FastGen's SD1.5 config for arXiv 2502.15681): Jensen-Shannon, lr 1e-5,
    bf16, GAN weight 1e-3, real CFG 1.75, TTUR 10, t ~ U[0.001, 0.999], global batch 2048
    (8 GPUs x 32 x 8 accumulation), 100k iterations."""
    from .methods.fdistill import FDistillConfig

    return RunConfig(
        method_name="fdistill",
        method=FDistillConfig(guidance_scale=1.75, student_every=10, t_min=0.001, t_max=0.999,
                              gan_weight_student=1e-3, gan_weight_critic=1e-2, divergence="js"),
        model=ModelConfig(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", student_timesteps=(999,),
                          teacher_dtype="bfloat16", gan_head=True),
        data=DataConfig(source="prompts", batch_size=32, prompts="data/prompts.txt"),
        train=TrainConfig(output_dir="runs/sd15_fdistill", max_steps=100_000, grad_accum=8, ema_decay=0.0,
                          mixed_precision="bf16", sample_every=1000, checkpoint_every=1000),
        optim={"student": OptimConfig(lr=1e-5), "critic": OptimConfig(lr=1e-5)},
    )


PRESETS = {
    "dmd2": {"digits_dmd2": digits_dmd2, "digits_dmd2_4step": digits_dmd2_4step, "sd15_dmd2": sd15_dmd2},
    "sid": {"digits_sid": digits_sid, "digits_sid_4step": digits_sid_4step, "sd15_sid_lsg": sd15_sid_lsg},
    "fdistill": {"digits_fdistill": digits_fdistill, "sd15_fdistill": sd15_fdistill},
}
