"""FewStepScheduler: sampling with a few-step student's explicit timestep list.

A few-step student (DMD2, arXiv 2405.14867, section 4.3 "multi-step generator"; consistency
models / LCM, arXiv 2310.04378, Algorithm 1 "multistep consistency sampling"; few-step SiD)
is trained on a fixed descending list of timesteps t_1 > ... > t_K. Sampling is:

    x0_k   = to_x0(student(x_k, t_k))                  (every prediction type pivots on x0)
    x_{k+1} = alpha(t_{k+1}) x0_k + sigma(t_{k+1}) eps,  eps ~ N(0, I)   ("x0 then re-noise")

and the last x0 is the sample. Two noise processes are supported:

* "vp": x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(abar_k), sigma_t = sqrt(1 - abar_k) at
  integer timestep k, abar from the DDPM beta schedules (Ho et al. 2020; scaled_linear of
  latent diffusion; squaredcos_cap_v2 of Nichol & Dhariwal 2021, arXiv 2102.09672, eq. 17).
* "flow": rectified flow, s = k / num_train_timesteps, x_t = (1 - s) x0 + s eps; the model predicts
  u = eps - x0 ("flow_prediction"), so x0 = x_t - s u.

Flow maps (MeanFlow, arXiv 2505.13447): a student F(x_t, t, r) that jumps from t to any earlier r samples at
every step count n up to a maximum. `flow_map_timesteps[n - 1]` is the n-step t-list and `flow_map_pairs[n - 1]`
its (t, r) pairs in flow time (r = the next listed time, 0 at the last step); each step is the "ddim" jump above
(z_r = z_t - (t - r) u is alpha_r x0 + sigma_r eps of the (x0, eps) the model's u implies), and the backbone sees
r through a `FewStepTimeOffset` (flowmap_fewstep.py, saved in `time_offset/` beside this file) that
`set_timesteps` hooks onto the calling pipeline's backbone(s), or onto those given to `attach`.

This file imports only the standard library, torch, numpy and diffusers so that it can be copied alone
into an exported pipeline directory and loaded with `trust_remote_code=True`. `save_pretrained` copies it
into the scheduler folder itself, and any pipeline holding this scheduler records it as
["scheduling_fewstep", "FewStepScheduler"], so a saved pipeline folder reloads in a Python without fewstep.
"""

import importlib.util
import math
import os
import shutil
import sys
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
# "fresh": x0 then re-noise with new noise (DMD2, LCM); "ddim": move deterministically along the noise the
# model implies (DDIM eta = 0, TCD gamma = 0), the multistep sampler of phased consistency models (PCM)
RENOISE = ("fresh", "ddim")
SIGMA_DATA = 0.5  # boundary scalings of latent consistency models (LCMScheduler's sigma_data)
# which prediction types are defined for which process (v is a VP notion, u = eps - x0 a flow one)
ALLOWED_PREDICTIONS = {
    "vp": ("epsilon", "v_prediction", "sample"),
    "flow": ("flow_prediction", "epsilon", "sample"),
}
# the module name of this file inside a saved scheduler folder (diffusers loads `<folder>/<module>.py`)
SAVED_MODULE = "scheduling_fewstep"
# a flow map's offset embedding: its folder inside the scheduler folder, and the file of its class there
TIME_OFFSET, TIME_OFFSET_MODULE = "time_offset", "flowmap_fewstep"


@dataclass
class FewStepSchedulerOutput(BaseOutput):
    """Output of `FewStepScheduler.step`: the next sample and the x0 estimate it was built from."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def vp_betas(num_train_timesteps, beta_start, beta_end, beta_schedule):
    """DDPM beta schedules as diffusers' DDPMScheduler defines them, in float32."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        # linear in sqrt(beta): the latent-diffusion schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # betas that discretize abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), each capped at 0.999
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1.0 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"beta_schedule={beta_schedule!r} is not supported; use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'."
    )


class FewStepScheduler(SchedulerMixin, ConfigMixin):
    """Explicit-timestep "x0 then re-noise" sampler for few-step students (VP or rectified flow).

    `train_timesteps` is the student's descending t-list (VP: ints in [0, T-1], e.g. [999, 749, 499, 249];
    flow: floats in (0, T]). `init_noise_scale` becomes `init_noise_sigma`, the factor pipelines apply to
    the initial unit noise (a SiD student whose input is sigma_t z sets it to that sigma_t).
    `timestep_scaling` > 0 applies consistency boundary scalings x0 <- c_skip x_t + c_out x0 (as
    LCMScheduler); `renoise` picks fresh noise or the deterministic "ddim" move between listed timesteps.
    `use_flow_sigmas` (flow students in stock pipelines) makes FluxPipeline leave out its default
    `sigmas=linspace(1, 1/n, n)`, so the trained t-list is used; stock pipelines read it off the config.
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        process: str = "vp",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        train_timesteps=None,
        init_noise_scale: float = 1.0,
        timestep_scaling: float = 0.0,
        renoise: str = "fresh",
        use_flow_sigmas: bool = False,
        flow_map_timesteps=None,
        flow_map_pairs=None,
    ):
        if process not in ALLOWED_PREDICTIONS:
            raise ValueError(f"process={process!r} is not supported; use 'vp' or 'flow'.")
        if prediction_type not in ALLOWED_PREDICTIONS[process]:
            raise ValueError(
                f"prediction_type={prediction_type!r} is not defined for process={process!r}; "
                f"use one of {list(ALLOWED_PREDICTIONS[process])}."
            )
        if renoise not in RENOISE:
            raise ValueError(f"renoise={renoise!r} is not supported; use one of {list(RENOISE)}.")
        if process == "vp":
            betas = vp_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
            self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        else:
            self.alphas_cumprod = None
        if train_timesteps is not None:
            train_timesteps = self._check_timesteps(train_timesteps, "train_timesteps")
            # store a plain list so the config is JSON-serializable whatever was passed in
            self.register_to_config(train_timesteps=train_timesteps)
        self.init_noise_sigma = float(init_noise_scale)
        self.num_inference_steps = None
        self.timesteps = self._as_tensor(train_timesteps) if train_timesteps is not None else None
        self.sigmas = None
        self._begin_index = None
        self._check_flow_map(flow_map_timesteps, flow_map_pairs)
        self.time_offset = None     # a flow map's FewStepTimeOffset (from_pretrained loads it from time_offset/)
        self._flow = None           # (the (t, r) pairs in use, the step in flight, weakref to the calling pipeline)
        self._attached = False      # whether attach() hooked a backbone by hand
        # a pipeline records each component as (obj.__module__, class name) in model_index.json; the class's own
        # module ("fewstep_pipelines.scheduling_fewstep", or "diffusers_modules.local..." once loaded from a
        # folder) cannot be imported elsewhere, the copy that save_config writes into the scheduler folder can
        self.__module__ = SAVED_MODULE

    def __len__(self):
        return self.config.num_train_timesteps

    def save_config(self, save_directory, push_to_hub=False, **kwargs):
        """Write scheduler_config.json and a copy of this file beside it (before any upload to the hub), so the
        folder loads with `trust_remote_code=True` where fewstep is not installed."""
        os.makedirs(save_directory, exist_ok=True)
        target = os.path.join(save_directory, SAVED_MODULE + ".py")
        _copy_source(__file__, target)
        if self.time_offset is not None:        # a flow map: its offset embedding, weights and code, beside it
            folder = os.path.join(save_directory, TIME_OFFSET)
            self.time_offset.save_pretrained(folder)
            source = type(self.time_offset).forward.__code__.co_filename
            _copy_source(source, os.path.join(folder, TIME_OFFSET_MODULE + ".py"))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False,
                        **kwargs):
        """`SchedulerMixin.from_pretrained`; a flow map also loads its offset embedding from `time_offset/` (the
        folder must be local: download a hub copy first)."""
        out = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                      return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = out[0] if return_unused_kwargs else out
        if scheduler.config.flow_map_pairs is not None:
            folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "", TIME_OFFSET)
            scheduler.time_offset = load_time_offset(folder)
        return out

    # ---------------------------------------------------------------- timesteps

    def _check_timesteps(self, timesteps, name):
        """Validate a descending t-list for this process; return it as a list of Python numbers."""
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.tolist()
        values = [float(t) for t in np.asarray(timesteps, dtype=np.float64).reshape(-1)]
        if not values:
            raise ValueError(f"{name} is empty; pass a descending list such as [999, 749, 499, 249].")
        T = self.config.num_train_timesteps
        for t in values:
            if self.config.process == "vp" and (t != round(t) or not 0 <= t <= T - 1):
                raise ValueError(f"{name} contains {t:g}; VP timesteps must be integers in [0, {T - 1}].")
            if self.config.process == "flow" and not 0 < t <= T:
                raise ValueError(f"{name} contains {t:g}; flow timesteps must lie in (0, {T}].")
        for a, b in zip(values, values[1:]):
            if not a > b:
                raise ValueError(f"{name} is not strictly descending at {a:g} -> {b:g}; pass it largest first.")
        if self.config.process == "vp":
            return [int(round(t)) for t in values]
        return values

    def _as_tensor(self, timesteps, device=None):
        dtype = torch.int64 if self.config.process == "vp" else torch.float32
        return torch.tensor(timesteps, dtype=dtype, device=device)

    def _trained_list(self, n):
        """The student's t-list, or trailing spacing over [0, T] when no list was trained."""
        if self.config.train_timesteps is not None:
            return list(self.config.train_timesteps)
        T = self.config.num_train_timesteps
        if self.config.process == "vp":
            return [int(round(t)) - 1 for t in np.linspace(T, 0, n, endpoint=False)]
        return [float(t) for t in np.linspace(T, 0, n, endpoint=False)]

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, mu=None):
        """Pick the sampling t-list: all trained steps, an evenly strided subset, or an explicit list.

        Flow students also take the list as `sigmas` (timesteps / num_train_timesteps), the argument flow
        pipelines forward; `mu` (a pipeline's resolution-dependent shift) is accepted and ignored, because
        the student's t-list is explicit and already holds whatever shift it was trained with.
        """
        if self.config.flow_map_pairs is not None:
            timesteps = self._flow_map_list(num_inference_steps, timesteps, sigmas)
            num_inference_steps = sigmas = None
        if sigmas is not None:
            if timesteps is not None:
                raise ValueError("got both sigmas=[...] and timesteps=[...]; pass only one of them.")
            if self.config.process != "flow":
                raise ValueError("sigmas=[...] is only defined for a flow student; this is a VP student: "
                                 f"pass {self._explicit_list_hint()}")
            timesteps = [float(s) * self.config.num_train_timesteps for s in np.asarray(sigmas).reshape(-1)]
        if timesteps is not None:
            chosen = self._check_timesteps(timesteps, "timesteps")
            if num_inference_steps is not None and num_inference_steps != len(chosen):
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} disagrees with timesteps={chosen}; pass only one."
                )
        else:
            chosen = self._subset(num_inference_steps)
        self.num_inference_steps = len(chosen)
        self.timesteps = self._as_tensor(chosen, device=device)
        # each listed timestep's sigma in the stock schedulers' convention (flow: sigma_t; VP: sigma_t / alpha_t,
        # as EulerDiscrete's) and a final 0; pipelines such as Wan's read them
        alpha, sigma = self.alpha_sigma(self.timesteps.cpu())
        sigma = sigma if self.config.process == "flow" else sigma / alpha
        self.sigmas = torch.cat([sigma, torch.zeros(1)]).to(device)
        self._begin_index = None
        if self.config.flow_map_pairs is not None:
            self._flow = (self.config.flow_map_pairs[len(chosen) - 1], 0, self._hook_caller())

    def _explicit_list_hint(self):
        """How a caller passes its own t-list. This scheduler cannot know which pipeline calls it, and pipelines
        differ: FewStepClassPipeline and e.g. StableDiffusionPipeline take timesteps=, flow pipelines such as
        FluxPipeline and StableDiffusion3Pipeline take only sigmas= (timesteps / num_train_timesteps)."""
        T = self.config.num_train_timesteps
        if self.config.process == "flow":
            return (f"an explicit descending list as the pipeline's timesteps=[...], or as sigmas=[t / {T}, ...] "
                    "where it takes only sigmas (FluxPipeline, StableDiffusion3Pipeline).")
        return ("an explicit descending list as the pipeline's timesteps=[...] (FewStepClassPipeline, "
                "StableDiffusionPipeline and other pipelines whose __call__ takes timesteps).")

    def set_begin_index(self, begin_index=0):
        """Kept for pipelines that set it before their loop; steps are located by timestep value."""
        self._begin_index = begin_index

    def _subset(self, n):
        trained = self.config.train_timesteps
        if n is None:
            if trained is None:
                raise ValueError(
                    "num_inference_steps=None but this scheduler has no train_timesteps; pass num_inference_steps, "
                    f"or {self._explicit_list_hint()}"
                )
            return list(trained)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            hint = f" up to {len(trained)} (trained on {list(trained)})" if trained is not None else ""
            raise ValueError(f"num_inference_steps={n!r} is invalid; pass a positive integer{hint}.")
        if trained is None and n > self.config.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={n} exceeds num_train_timesteps={self.config.num_train_timesteps}; "
                "pass fewer steps."
            )
        full = self._trained_list(int(n))
        K = len(full)
        if n > K:
            raise ValueError(
                f"num_inference_steps={n} exceeds the {K} steps the student was trained on ({full}); "
                f"pass num_inference_steps <= {K}, or {self._explicit_list_hint()}"
            )
        # evenly strided subset that always keeps the first (noisiest) trained step
        idx = np.round(np.linspace(0, K, int(n), endpoint=False)).astype(int)
        return [full[i] for i in idx]

    # ---------------------------------------------------------------- noise process

    def alpha_sigma(self, timestep):
        """(alpha_t, sigma_t) in float32 for a scalar or 1-D tensor of timesteps."""
        t = torch.as_tensor(timestep).reshape(-1)
        if self.config.process == "vp":
            k = t.round().long() if t.is_floating_point() else t.long()
            abar = self.alphas_cumprod.to(t.device)[k]
            return abar.sqrt(), (1.0 - abar).sqrt()
        s = t.to(torch.float32) / self.config.num_train_timesteps
        return 1.0 - s, s

    def to_x0(self, model_output, timestep, sample):
        """Convert a model output at `timestep` into the x0 estimate (float32 maths, sample dtype out)."""
        alpha, sigma = (_expand(v, sample) for v in self.alpha_sigma(timestep))
        x_t = sample.to(torch.float32)
        out = model_output.to(torch.float32)
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (x_t - sigma * out) / alpha
        elif kind == "v_prediction":
            x0 = alpha * x_t - sigma * out
        elif kind == "flow_prediction":
            x0 = x_t - sigma * out
        else:
            x0 = out
        return x0.to(sample.dtype)

    def add_noise(self, original_samples, noise, timesteps):
        """Forward process x_t = alpha_t x0 + sigma_t eps, one timestep per sample (or one for all)."""
        alpha, sigma = (_expand(v, original_samples) for v in self.alpha_sigma(timesteps))
        x_t = alpha * original_samples.to(torch.float32) + sigma * noise.to(torch.float32)
        return x_t.to(original_samples.dtype)

    def scale_model_input(self, sample, timestep=None):
        """Identity: the student sees x_t unscaled (kept for diffusers pipeline compatibility)."""
        return sample

    # ---------------------------------------------------------------- sampling

    def _index_of(self, timestep):
        if self.timesteps is None:
            raise ValueError("FewStepScheduler.step called before set_timesteps; call set_timesteps first.")
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        gaps = (self.timesteps.cpu().to(torch.float64) - t).abs()
        i = int(torch.argmin(gaps))
        if gaps[i] > 1e-3:
            raise ValueError(f"timestep {t:g} is not in scheduler.timesteps {self.timesteps.tolist()}.")
        return i

    def boundary_scalings(self, timestep):
        """Consistency-model scalings (c_skip, c_out) at `timestep` as LCMScheduler defines them (consistency
        models, arXiv 2303.01469; LCM, arXiv 2310.04378): sigma_data 0.5 and the timestep multiplied by
        `timestep_scaling`, so c_skip = 1 and c_out = 0 at timestep 0; (0, 1) when the scaling is 0 (off)."""
        if not self.config.timestep_scaling:
            return 0.0, 1.0
        scaled = float(torch.as_tensor(timestep).reshape(-1)[0]) * self.config.timestep_scaling
        return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One few-step update: x0 from the model output, then re-noise to the next listed timestep."""
        i = self._index_of(timestep)
        x0 = self.to_x0(model_output, timestep, sample)
        if self.config.timestep_scaling:
            c_skip, c_out = self.boundary_scalings(timestep)
            x0 = (c_skip * sample.to(torch.float32) + c_out * x0.to(torch.float32)).to(sample.dtype)
        if i == len(self.timesteps) - 1:
            prev_sample = x0
        elif self.config.renoise == "ddim":
            alpha, sigma = (_expand(v, sample) for v in self.alpha_sigma(timestep))
            eps = (sample.to(torch.float32) - alpha * x0.to(torch.float32)) / sigma
            prev_sample = self.add_noise(x0, eps, self.timesteps[i + 1])
        else:
            eps = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = self.add_noise(x0, eps, self.timesteps[i + 1])
        if self._flow is not None:         # the next backbone call is step i + 1's; none after the last
            self._flow = None if i == len(self.timesteps) - 1 else (self._flow[0], i + 1, self._flow[2])
        if not return_dict:
            return prev_sample, x0
        return FewStepSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    # ---------------------------------------------------------------- flow maps

    def _check_flow_map(self, lists, pairs):
        if lists is None and pairs is None:
            return
        if lists is None or pairs is None:
            raise ValueError("flow_map_timesteps and flow_map_pairs come together (a t-list and its (t, r) pairs "
                             "for each step count); pass both or neither.")
        lists = [self._check_timesteps(ts, f"flow_map_timesteps[{n}]") for n, ts in enumerate(lists)]
        pairs = [[[float(t), float(r)] for t, r in steps] for steps in pairs]
        counts = list(range(1, len(lists) + 1))
        if [len(ts) for ts in lists] != counts or [len(p) for p in pairs] != counts:
            raise ValueError("flow_map_timesteps[n - 1] and flow_map_pairs[n - 1] must hold n entries each "
                             f"(n = 1, 2, ...); got {[len(ts) for ts in lists]} and {[len(p) for p in pairs]}.")
        self.register_to_config(flow_map_timesteps=lists, flow_map_pairs=pairs)

    def _flow_map_list(self, n, timesteps, sigmas):
        """The recorded n-step t-list of a flow map (n = None: the trained step count)."""
        lists = self.config.flow_map_timesteps
        if timesteps is not None or sigmas is not None:
            raise ValueError(f"this flow-map scheduler samples the t-lists it records for 1 to {len(lists)} steps "
                             "(each step's r is the next of them); pass num_inference_steps, not timesteps or sigmas.")
        if n is None:
            n = len(self.config.train_timesteps or lists[-1])
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(lists):
            raise ValueError(f"num_inference_steps={n!r} is invalid; this flow map samples 1 to {len(lists)} steps.")
        return list(lists[n - 1])

    def attach(self, model):
        """Hook the flow map's offset embedding onto `model`, a backbone called outside a pipeline (within one,
        `set_timesteps` hooks the pipeline's own backbones); it then sees r on each step of this scheduler."""
        self._offset().attach(model, self._pair_in_flight)
        self._attached = True

    def _offset(self):
        if self.time_offset is None:
            raise ValueError("this flow-map scheduler has no time offset; load it with "
                             f"FewStepScheduler.from_pretrained from its folder (with {TIME_OFFSET}/), not from_config.")
        return self.time_offset

    def _hook_caller(self):
        """Hook the offset onto the backbones of the pipeline that called `set_timesteps` (a stock pipeline hands its
        backbone only t; this scheduler knows r): a weak reference to that pipeline, or None."""
        pipe = self._offset().hook_caller(self, sys._getframe(2), self._pair_in_flight)
        if pipe is None and not self._attached:
            raise ValueError("a flow-map scheduler used outside a diffusers pipeline needs its backbone: call "
                             "scheduler.attach(backbone) once before sampling.")
        return None if pipe is None else weakref.ref(pipe)

    def _pair_in_flight(self):
        """The flow-time (t, r) of the backbone call in flight, or None (not sampling, or the pipeline that this
        scheduler was hooked through now holds another scheduler)."""
        if self._flow is None:
            return None
        pairs, k, owner = self._flow
        if owner is not None and getattr(owner(), "scheduler", None) is not self:
            return None
        return pairs[k]


def _copy_source(src, dst):
    # saving into the folder the code was loaded from would copy a file onto itself
    if not os.path.exists(dst) or not os.path.samefile(src, dst):
        shutil.copyfile(src, dst)


def load_time_offset(folder):
    """The `FewStepTimeOffset` saved in `folder`, built by the copy of its class saved beside its weights."""
    path = os.path.join(folder, TIME_OFFSET_MODULE + ".py")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} holds no {TIME_OFFSET_MODULE}.py: a flow-map scheduler needs its time offset "
                         "beside it; load the scheduler from a local copy of the whole exported folder.")
    spec = importlib.util.spec_from_file_location(TIME_OFFSET_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FewStepTimeOffset.from_pretrained(folder).eval()


def _expand(v, like):
    """Broadcast a per-sample (or single) float32 coefficient over the trailing dims of `like`."""
    v = v.to(device=like.device, dtype=torch.float32)
    return v.reshape(-1, *([1] * (like.ndim - 1)))
