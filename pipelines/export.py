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

import json
import os
import shutil
import uuid
from pathlib import Path

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
    if "FlowMatch" in str(config.get("_class_name", "")) or "beta_schedule" not in config:
        return FewStepScheduler(process="flow", prediction_type="flow_prediction", **common)
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
