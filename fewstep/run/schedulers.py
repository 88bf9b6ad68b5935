"""A student's ``Sampling`` -> the diffusers scheduler that reproduces it exactly.

Stock schedulers where their default schedule is the student's t-list and their step is fewstep's (x0, then
fresh noise, or LCM's boundary scalings): ``LCMScheduler`` (VP), ``FlowMatchLCMScheduler`` (flow); otherwise
the bundled ``FewStepScheduler`` (explicit t-list, input scaling, DDIM jumps), copied into the exported folder.
A flow-map student always takes ``FewStepScheduler``: no stock scheduler can tell the backbone the target time r.
"""
from __future__ import annotations

import inspect

import numpy as np
from fewstep_pipelines import FewStepScheduler
from fewstep_pipelines.flowmap_fewstep import FewStepTimeOffset

from fewstep.core.generator import Sampling


def _config_dict(teacher_scheduler_config):
    config = getattr(teacher_scheduler_config, "config", teacher_scheduler_config)
    return dict(config)


def _is_flow(config):
    """Rectified-flow teachers: FlowMatch* schedulers, and multistep solvers run on flow sigmas (Sana, Wan)."""
    return ("FlowMatch" in str(config.get("_class_name", "")) or bool(config.get("use_flow_sigmas"))
            or "beta_schedule" not in config)


def fewstep_scheduler_for(teacher_scheduler_config, train_timesteps, init_noise_scale=1.0):
    """A FewStepScheduler with the teacher's noise process and prediction type and the student's t-list.

    Accepts the config (or the scheduler) of a DDPM/DDIM-like VP scheduler (betas + prediction_type)
    or of FlowMatchEulerDiscreteScheduler (rectified flow, prediction u = eps - x0). A flow teacher's
    `shift` only changes its default t-list, and the student's t-list is explicit, so it is not needed.
    """
    config = _config_dict(teacher_scheduler_config)
    common = dict(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        train_timesteps=train_timesteps,
        init_noise_scale=init_noise_scale,
    )
    if _is_flow(config):
        # use_flow_sigmas: FluxPipeline then leaves out its default sigmas and the trained t-list is used
        return FewStepScheduler(process="flow", prediction_type="flow_prediction", use_flow_sigmas=True, **common)
    if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
        raise ValueError(
            "teacher scheduler uses trained_betas or rescale_betas_zero_snr, which FewStepScheduler does not "
            "reproduce; export with a stock LCMScheduler instead."
        )
    return FewStepScheduler(
        process="vp",
        beta_start=config.get("beta_start", 0.0001),
        beta_end=config.get("beta_end", 0.02),
        beta_schedule=config.get("beta_schedule", "linear"),
        prediction_type=config.get("prediction_type", "epsilon"),
        **common,
    )


# LCMScheduler's timestep_scaling for students trained without consistency boundary scalings (DMD2, SiD,
# f-distill): c_skip <= 2.5e-7 and c_out >= 1 - 1.3e-7 at every timestep >= 1, so x0 is the model's own
NO_BOUNDARY_SCALING = 1000.0
# pipelines that pass sigmas=linspace(1, 1/n, n) to a flow scheduler unless its config sets use_flow_sigmas
PASSES_LINEAR_SIGMAS = ("FluxPipeline",)


def lcm_scheduler_for(teacher_scheduler_config, train_timesteps):
    """A stock `LCMScheduler` whose `num_inference_steps=K` schedule is exactly the student's K timesteps,
    or None when no `original_inference_steps` gives them (e.g. [399], or a flow teacher).

    LCM's K-step schedule takes `floor(linspace(0, O, K))` of `[O k - 1, ..., k - 1]`, `k = T // O`; the
    smallest matching O is used (O = K for DMD2's [999, 749, 499, 249]). Its re-noising is fewstep's
    "x0 then fresh noise", drawn from the pipeline's generator in the same order.
    """
    config = _config_dict(teacher_scheduler_config)
    if _is_flow(config) or config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
        return None
    ts = [float(t) for t in train_timesteps]
    if any(t != round(t) or t < 1 for t in ts):
        return None
    ts, K, T = [int(t) for t in ts], len(ts), config.get("num_train_timesteps", 1000)
    idx = None
    for original in range(K, T + 1):
        origin = np.arange(original, 0, -1) * (T // original) - 1
        idx = np.floor(np.linspace(0, original, K, endpoint=False)).astype(int)
        if origin[idx].tolist() == ts:
            break
    else:
        return None
    from diffusers import LCMScheduler

    known = set(inspect.signature(LCMScheduler.__init__).parameters)   # other schedulers' keys would be warned about
    sched = LCMScheduler.from_config({k: v for k, v in config.items() if k in known}, clip_sample=False,
                                     original_inference_steps=original, timestep_scaling=NO_BOUNDARY_SCALING,
                                     thresholding=False)
    probe = LCMScheduler.from_config(sched.config)
    probe.set_timesteps(K)
    return sched if probe.timesteps.tolist() == ts else None


def flow_lcm_scheduler_for(teacher_scheduler_config, train_timesteps, pipeline_class=""):
    """A stock `FlowMatchLCMScheduler` (x0 = x_t - sigma u, then fresh noise to the next sigma) whose
    default schedule in `pipeline_class` is exactly the student's, or None.

    Without dynamic shifting and with shift 1 it gives `linspace(1, 1/1000, K)` where the pipeline passes
    no sigmas (SD3, Sana, Wan) and `linspace(1, 1/K, K)` in FluxPipeline: one step at timestep 1000 works
    everywhere, [1000, 750, 500, 250] in Flux. Checked by running `set_timesteps` as the pipeline does.
    """
    config = _config_dict(teacher_scheduler_config)
    if not _is_flow(config):
        return None
    from diffusers import FlowMatchLCMScheduler

    T, K = config.get("num_train_timesteps", 1000), len(train_timesteps)
    sched = FlowMatchLCMScheduler(num_train_timesteps=T, shift=1.0, use_dynamic_shifting=False)
    probe = FlowMatchLCMScheduler.from_config(sched.config)
    probe.set_timesteps(K, sigmas=np.linspace(1.0, 1 / K, K) if pipeline_class in PASSES_LINEAR_SIGMAS else None)
    target = np.asarray([float(t) for t in train_timesteps]) / T
    return sched if np.allclose(probe.sigmas[:-1].numpy(), target, rtol=0, atol=1e-6) else None


def student_scheduler_for(teacher_scheduler_config, train_timesteps, init_noise_scale=1.0, pipeline_class=""):
    """The scheduler that makes the stock `pipeline_class` sample exactly as fewstep's few-step sampler:
    stock `LCMScheduler` (VP) or `FlowMatchLCMScheduler` (flow) when their default `num_inference_steps=K`
    schedule is the student's t-list, else `FewStepScheduler` (a custom component). A scaled initial
    noise (SiD) always takes `FewStepScheduler`, whose `init_noise_sigma` VP pipelines apply."""
    if init_noise_scale == 1.0:
        stock = lcm_scheduler_for(teacher_scheduler_config, train_timesteps) or flow_lcm_scheduler_for(
            teacher_scheduler_config, train_timesteps, pipeline_class)
        if stock is not None:
            return stock
    return fewstep_scheduler_for(teacher_scheduler_config, list(train_timesteps), init_noise_scale)


def scheduler_for(spec: Sampling, teacher_scheduler_config, pipeline_class: str = ""):
    """The scheduler an exported pipeline samples ``spec`` with. ``pipeline_class`` is the teacher's stock
    text-to-image pipeline ("" for the class-conditional ``FewStepClassPipeline``)."""
    config = _config_dict(teacher_scheduler_config)
    ts = list(spec.timesteps)
    # consistency students (LCM's boundary scalings) and deterministic multi-step students (PCM, MeanFlow: DDIM jumps)
    if spec.timestep_scaling or spec.renoise == "ddim":
        if spec.renoise == "fresh" and not _is_flow(config):
            from diffusers import LCMScheduler

            return LCMScheduler.from_config(config, original_inference_steps=len(ts), clip_sample=False,
                                            timestep_spacing="trailing", timestep_scaling=spec.timestep_scaling)
        base = fewstep_scheduler_for(config, ts, spec.init_scale)
        return FewStepScheduler.from_config(base.config, timestep_scaling=spec.timestep_scaling, renoise=spec.renoise)
    if not pipeline_class:
        return fewstep_scheduler_for(config, ts, init_noise_scale=spec.init_scale)
    sched = student_scheduler_for(config, ts, spec.init_scale, pipeline_class)
    if pipeline_class == "IFPipeline" and "variance_type" in config:
        # IFPipeline reads its UNet's output layout (prediction only, or + variance) from the scheduler config
        sched.register_to_config(variance_type=config["variance_type"])
    return sched


def flow_map_scheduler_for(spec: Sampling, teacher_scheduler_config, flow_map=None):
    """A flow-map student's ``FewStepScheduler``: DDIM jumps on its t-list and, from ``flow_map`` (a
    ``core.flow_map.FlowMap``), each step count's t-list and flow-time (t, r) pairs and the offset embedding it hooks onto
    the pipeline's backbone (``FewStepTimeOffset``); without ``flow_map``, the scheduler alone (a check)."""
    base = fewstep_scheduler_for(teacher_scheduler_config, list(spec.timesteps), spec.init_scale)
    if flow_map is None:
        return FewStepScheduler.from_config(base.config, renoise="ddim")
    sched = FewStepScheduler.from_config(base.config, renoise="ddim", flow_map_timesteps=flow_map.timesteps,
                                         flow_map_pairs=flow_map.pairs)
    offset = FewStepTimeOffset(**flow_map.offset_config, time_embedding=flow_map.time_embedding)
    offset.load_state_dict(flow_map.offset_state)
    sched.time_offset = offset.eval()
    return sched
