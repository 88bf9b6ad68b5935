"""FewStepClassPipeline: class-conditional pixel-space sampling for teachers and few-step students.

diffusers has no class-conditional `UNet2DModel` pipeline with classifier-free guidance, so this one
fills the gap for both the many-step teacher (with `DDIMScheduler`) and its few-step student (with
`FewStepScheduler`, or any stock scheduler). Classifier-free guidance (Ho & Salimans, arXiv 2207.12598)
is always `uncond + w * (cond - uncond)` on the model output; w = 1 is no guidance. The null label
is the last class embedding: the unet has `num_class_embeds = num_classes + 1`.

This file imports only the standard library, torch, numpy and diffusers so that it can be copied alone into
an exported pipeline directory and loaded with `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`.
`save_pretrained` copies it there itself, so a reloaded pipeline saves a folder that reloads the same way.
"""

import inspect
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt")
DEFAULT_STEPS = 50
EXPERTS = ("unet_1", "unet_2", "unet_3")  # optional per-phase experts after `unet` (Phased DMD)
# the module names a saved folder uses: diffusers loads `<module>.py` beside model_index.json (the pipeline)
# or inside a component folder, with trust_remote_code=True (the hub convention for custom code)
PIPELINE_MODULE = "pipeline_fewstep"
SCHEDULER_MODULE, SCHEDULER_CLASS = "scheduling_fewstep", "FewStepScheduler"


class FewStepClassPipeline(DiffusionPipeline):
    """Class-conditional sampling from a `UNet2DModel` whose last class index is the null label.

    A phased student (Phased DMD, arXiv 2510.27684) has one expert unet per phase: `unet` runs above the
    first of the descending `expert_boundaries` (timesteps), `unet_k` at timesteps <= the k-th boundary,
    the switch diffusers' Wan 2.2 pipeline makes between its two transformers at `boundary_ratio`.
    """

    model_cpu_offload_seq = "unet"
    _optional_components = list(EXPERTS)

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, unet_1: UNet2DModel = None,
                 unet_2: UNet2DModel = None, unet_3: UNet2DModel = None, expert_boundaries=None):
        super().__init__()
        experts = [u for u in (unet_1, unet_2, unet_3) if u is not None]
        bounds = [int(b) for b in expert_boundaries or []]
        if len(bounds) != len(experts) or any(a <= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"expert_boundaries={expert_boundaries} must list one descending timestep per "
                             f"extra expert unet ({len(experts)} given, filled in order unet_1, unet_2, unet_3).")
        self.register_modules(unet=unet, scheduler=scheduler, unet_1=unet_1, unet_2=unet_2, unet_3=unet_3)
        self.register_to_config(expert_boundaries=bounds or None)
        self.expert_boundaries = bounds or None   # a plain attribute too: tools that getattr it see no deprecation

    def save_config(self, save_directory, push_to_hub=False, **kwargs):
        """Write model_index.json, then make the folder load without fewstep (see `_make_self_contained`).

        `save_pretrained` writes model_index.json last, through this method, after every component folder and
        before any upload to the hub, so hooking here covers `save_pretrained` and its `push_to_hub` alike.
        """
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)
        self._make_self_contained(Path(save_directory))

    def _make_self_contained(self, folder):
        """Copy the custom code beside what uses it and point model_index.json at the copies.

        diffusers records custom classes by their import path ("fewstep_pipelines.pipeline_fewstep", or
        "diffusers_modules.local..." once loaded from a folder), which another Python cannot import.
        """
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index.pop("_name_or_path", None)   # the folder this pipeline was loaded from: meaningless to a user
        _copy_source(Path(__file__), folder / f"{PIPELINE_MODULE}.py")
        index["_class_name"] = [PIPELINE_MODULE, "FewStepClassPipeline"]
        for name, entry in index.items():
            cls = _class_named(getattr(self, name, None), SCHEDULER_CLASS) if isinstance(entry, list) else None
            if cls is not None and (folder / name).is_dir():
                _copy_source(Path(inspect.getfile(cls)), folder / name / f"{SCHEDULER_MODULE}.py")
                index[name] = [SCHEDULER_MODULE, SCHEDULER_CLASS]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def unet_at(self, timestep):
        """The expert that owns `timestep`: one more expert below each boundary it does not exceed."""
        k = sum(float(timestep) <= b for b in self.config.expert_boundaries or [])
        return self.unet if k == 0 else getattr(self, EXPERTS[k - 1])

    @property
    def num_classes(self):
        """Number of real classes; index `num_classes` is the null (unconditional) label."""
        return self.unet.config.num_class_embeds - 1

    def default_num_inference_steps(self):
        """The student's trained step count when the scheduler records it, else 50."""
        trained = getattr(self.scheduler.config, "train_timesteps", None)
        if trained is not None:
            return len(trained)
        # a consistency student exported with LCMScheduler records its step count as original_inference_steps
        return getattr(self.scheduler.config, "original_inference_steps", None) or DEFAULT_STEPS

    def _labels(self, class_labels, device):
        """Validate class labels (an int, a list, tuple or range of ints, an integer numpy array or tensor) and
        return a 1-D LongTensor."""
        if isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.dtype == torch.bool:
                raise ValueError(f"class_labels has dtype {class_labels.dtype}; pass an integer (Long) tensor.")
            values = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, np.ndarray):
            if not np.issubdtype(class_labels.dtype, np.integer):   # bool is not an integer dtype in numpy
                raise ValueError(f"class_labels has dtype {class_labels.dtype}; pass an integer numpy array.")
            values = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (list, tuple, range)):
            values = list(class_labels)
        else:
            values = [class_labels]
        if not values:
            raise ValueError("class_labels is empty; pass at least one class index.")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < self.num_classes:
                raise ValueError(
                    f"class label {v!r} is invalid; pass integers in [0, {self.num_classes}) "
                    f"(index {self.num_classes} is the null label used for guidance)."
                )
        return torch.tensor([int(v) for v in values], dtype=torch.long, device=device)

    def _check_args(self, batch_size, num_inference_steps, guidance_scale, generator, output_type):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is unknown; use one of {list(OUTPUT_TYPES)}.")
        try:
            w = float(guidance_scale)
        except (TypeError, ValueError):
            w = math.nan
        if isinstance(guidance_scale, bool) or not math.isfinite(w) or w < 0:
            raise ValueError(
                f"guidance_scale={guidance_scale!r} is invalid; pass a finite number >= 0 (1.0 means no guidance)."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {batch_size}; pass one generator per image "
                "or a single generator."
            )
        n = num_inference_steps
        if n is None:   # only with an explicit timesteps list, which sets the step count
            return
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(
                f"num_inference_steps={n!r} is invalid; pass a positive integer "
                f"(this scheduler's default is {self.default_num_inference_steps()})."
            )

    def _set_timesteps(self, num_inference_steps, timesteps, device):
        """The scheduler's own t-list for a step count, or the caller's explicit list (as stock pipelines'
        `timesteps=`), which only schedulers whose set_timesteps takes `timesteps` accept."""
        if timesteps is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            return
        if "timesteps" not in inspect.signature(self.scheduler.set_timesteps).parameters:
            raise ValueError(
                f"timesteps={timesteps} is not supported by {type(self.scheduler).__name__}; "
                "pass num_inference_steps instead."
            )
        steps = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
        self.scheduler.set_timesteps(timesteps=timesteps, device=device, **steps)

    def _initial_latents(self, batch_size, generator, latents, device, dtype):
        """Unit noise (or the given latents) times the scheduler's initial noise scale."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; pass a tensor of shape {shape}.")
        # flow-matching schedulers define no init_noise_sigma: their initial noise is unit
        return latents.to(device=device, dtype=dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def _model_output(self, x, t, labels, guidance_scale):
        """Unet output with classifier-free guidance uncond + w (cond - uncond); one pass when w = 1."""
        batch = x.shape[0]
        unet = self.unet_at(t)
        if guidance_scale == 1.0:
            return unet(x, t.expand(batch), class_labels=labels).sample
        null = torch.full_like(labels, self.num_classes)
        both = unet(
            torch.cat([x, x]), t.expand(2 * batch), class_labels=torch.cat([null, labels])
        ).sample
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _device_and_dtype(self):
        """Where the unet runs and its dtype. Read off its first parameter unless accelerate's offload hooks
        move it (diffusers' `_execution_device` and `unet.dtype` walk every module: ~4 ms a call, a tenth of a
        one-step digits image on a CPU)."""
        p = next(self.unet.parameters())
        if hasattr(self.unet, "_hf_hook") or p.device.type == "meta":
            return self._execution_device, self.unet.dtype
        return p.device, p.dtype

    def _to_output(self, x, output_type):
        images = (x.to(torch.float32) / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        return images if output_type == "np" else self.numpy_to_pil(images)

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        num_inference_steps=None,
        guidance_scale=1.0,
        generator=None,
        latents=None,
        output_type="pil",
        return_dict=True,
        timesteps=None,
    ):
        """Generate one image per class label.

        num_inference_steps defaults to the student's trained step count (else 50). `timesteps` is an explicit
        descending t-list instead (e.g. [999, 499] for FewStepScheduler), as stock diffusers pipelines take it.
        With one generator per image the result for each image does not depend on the batch size.
        """
        device, dtype = self._device_and_dtype()
        labels = self._labels(class_labels, device)
        if num_inference_steps is None and timesteps is None:
            num_inference_steps = self.default_num_inference_steps()
        self._check_args(len(labels), num_inference_steps, guidance_scale, generator, output_type)
        self._set_timesteps(num_inference_steps, timesteps, device)
        x = self._initial_latents(len(labels), generator, latents, device, dtype)
        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator
        # flow-matching schedulers have no scale_model_input: their model sees x_t as is
        scale = getattr(self.scheduler, "scale_model_input", lambda sample, timestep: sample)
        for t in self.progress_bar(self.scheduler.timesteps):
            t_in = torch.as_tensor(t, device=device).reshape(1)
            out = self._model_output(scale(x, t), t_in, labels, float(guidance_scale))
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
        images = self._to_output(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _class_named(obj, name):
    """The class called `name` in obj's MRO, or None; by name, because a class loaded from a saved folder
    lives in its own dynamic module and is not the class object this file would import."""
    return next((c for c in type(obj).__mro__ if c.__name__ == name), None) if obj is not None else None


def _copy_source(src, dst):
    # saving into the folder the code was loaded from would copy a file onto itself
    if not dst.exists() or not dst.samefile(src):
        shutil.copyfile(src, dst)
