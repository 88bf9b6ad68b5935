"""Write a student pipeline as a self-contained diffusers directory (DESIGN.md section 7).

`save_pipeline_dir` calls `save_pretrained`, then makes the directory loadable in a Python that has
diffusers but not fewstep: diffusers records custom classes under their import path
("fewstep_pipelines.scheduling_fewstep"), which a user's Python cannot import, so the custom files
are copied in and `model_index.json` is pointed at them, the hub convention for custom code:

    model_index.json              "_class_name": ["pipeline_fewstep", "FewStepClassPipeline"]
    pipeline_fewstep.py           found by diffusers next to model_index.json
    scheduler/scheduling_fewstep.py   "scheduler": ["scheduling_fewstep", "FewStepScheduler"]

diffusers resolves a component entry [module, class] to `<component folder>/<module>.py` when that
file exists, and a list-valued `_class_name` to `<module>.py` beside model_index.json; both need
`trust_remote_code=True`. The directory is written to a temporary sibling and renamed into place.
"""

import inspect
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .pipeline_fewstep import FewStepClassPipeline
from .scheduling_fewstep import FewStepScheduler

HERE = Path(__file__).resolve().parent
PIPELINE_FILE = "pipeline_fewstep.py"
SCHEDULER_FILE = "scheduling_fewstep.py"


class ExportDirExistsError(FileExistsError, ValueError):
    """The export folder already holds files and overwrite was not requested."""


def _is_a(obj, class_name):
    # match by name along the MRO so that classes loaded from an exported directory (a separate
    # dynamic module, not the class object imported here) are recognised too
    return any(c.__name__ == class_name for c in type(obj).__mro__)


def _check_out_dir(out_dir, overwrite):
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"export path {out_dir} is a file; pass a folder path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportDirExistsError(
            f"export folder {out_dir} is not empty; pass overwrite=True or choose a new folder."
        )


def _make_self_contained(pipe, folder):
    """Copy the custom code files into `folder` and point model_index.json at them."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    # a pipeline that was itself loaded from disk records its source path; it means nothing to a user
    index.pop("_name_or_path", None)
    if _is_a(pipe, "FewStepClassPipeline"):
        shutil.copyfile(HERE / PIPELINE_FILE, folder / PIPELINE_FILE)
        index["_class_name"] = [Path(PIPELINE_FILE).stem, "FewStepClassPipeline"]
    for name, entry in index.items():
        component = getattr(pipe, name, None) if isinstance(entry, list) and not name.startswith("_") else None
        if component is not None and _is_a(component, "FewStepScheduler"):
            shutil.copyfile(HERE / SCHEDULER_FILE, folder / name / SCHEDULER_FILE)
            index[name] = [Path(SCHEDULER_FILE).stem, "FewStepScheduler"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _move_into_place(tmp, out_dir):
    """Rename `tmp` to `out_dir`, replacing what is there only after the new folder is complete."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def save_pipeline_dir(pipe, out_dir, model_card=None, overwrite=False):
    """Save `pipe` to `out_dir` as a directory that `DiffusionPipeline.from_pretrained(out_dir,
    trust_remote_code=True)` loads without fewstep installed. Returns the folder as a Path."""
    out_dir = Path(out_dir).resolve()
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pipe.save_pretrained(tmp)
        _make_self_contained(pipe, tmp)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)
        _move_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def class_pipeline_from_unet(unet, scheduler):
    """A FewStepClassPipeline around a class-conditional UNet2DModel (put in eval mode) and a scheduler."""
    return FewStepClassPipeline(unet=unet.eval(), scheduler=scheduler)


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


# ------------------------------------------------------------------ text-to-image students in stock pipelines

# LCMScheduler's timestep_scaling for students trained without consistency boundary scalings (DMD2, SiD,
# f-distill): c_skip <= 2.5e-7 and c_out >= 1 - 1.3e-7 at every timestep >= 1, so x0 is the model's own
NO_BOUNDARY_SCALING = 1000.0
# pipelines that pass sigmas=linspace(1, 1/n, n) to a flow scheduler unless its config sets use_flow_sigmas
PASSES_LINEAR_SIGMAS = ("FluxPipeline",)
SKIP_SUFFIXES = (".msgpack", ".onnx", ".onnx_data", ".h5", ".ckpt")   # other frameworks' weights


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


def _copy_component(src, dst):
    """Copy one component folder of a teacher pipeline (following hub-cache symlinks), without other
    frameworks' weights and without `.bin` weights that have a `.safetensors` twin."""
    def ignore(folder, names):
        safetensors = any(n.endswith(".safetensors") for n in names)
        return [n for n in names if n.endswith(SKIP_SUFFIXES) or (safetensors and n.endswith(".bin"))]

    shutil.copytree(src, dst, ignore=ignore)


def save_student_pipeline(teacher_dir, folder, models, scheduler, model_card=None, config_updates=None):
    """Write the teacher's stock pipeline into the new folder `folder` with the backbones in `models`
    (e.g. `{"unet": student}`, or Wan 2.2's `{"transformer": ..., "transformer_2": ...}`) and `scheduler`
    swapped in. Every other component (text encoders, tokenizers, VAE) is copied from `teacher_dir`
    unchanged; `model_index.json` is the teacher's with the new entries and `config_updates`. A
    `FewStepScheduler` is copied in as a custom component (load with `trust_remote_code=True`)."""
    teacher_dir, folder = Path(teacher_dir), Path(folder)
    index = json.loads((teacher_dir / "model_index.json").read_text())
    folder.mkdir(parents=True, exist_ok=False)
    for name, entry in index.items():
        if name.startswith("_") or name in models or name == "scheduler" or not isinstance(entry, list):
            continue
        if entry[0] is not None and (teacher_dir / name).is_dir():
            _copy_component(teacher_dir / name, folder / name)
    for name, model in models.items():
        model.save_pretrained(folder / name)
        index[name] = ["diffusers", type(model).__name__]
    scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    if _is_a(scheduler, "FewStepScheduler"):
        shutil.copyfile(HERE / SCHEDULER_FILE, folder / "scheduler" / SCHEDULER_FILE)
        index["scheduler"] = [Path(SCHEDULER_FILE).stem, "FewStepScheduler"]
    index.update(config_updates or {})
    index.pop("_name_or_path", None)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if model_card is not None:
        (folder / "README.md").write_text(model_card)
    return folder


def save_lora(pipeline_class, folder, model_folder, lora_state_dict, rank, target_modules):
    """Write `pytorch_lora_weights.safetensors` with the pipeline class's own `save_lora_weights`
    (`unet_lora_layers=` or `transformer_lora_layers=`; it adds the `unet.`/`transformer.` key prefix
    that `load_lora_weights` needs). Returns False when the pipeline class has no LoRA support."""
    save = getattr(pipeline_class, "save_lora_weights", None)
    if save is None:
        return False
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": sorted(target_modules)}
    save(str(folder), **{f"{model_folder}_lora_layers": lora_state_dict,
                         f"{model_folder}_lora_adapter_metadata": metadata}, safe_serialization=True)
    return True
