"""Writing diffusers folders that load without fewstep.

``save_pipeline_dir`` calls ``save_pretrained``, then makes the folder loadable in a Python that has
diffusers but not fewstep: diffusers records custom classes under their import path
("fewstep_pipelines.scheduling_fewstep"), which a user's Python cannot import, so the custom files are
copied in and ``model_index.json`` is pointed at them, the hub convention for custom code:

    model_index.json                  "_class_name": ["pipeline_fewstep", "FewStepClassPipeline"]
    pipeline_fewstep.py               found by diffusers next to model_index.json
    scheduler/scheduling_fewstep.py   "scheduler": ["scheduling_fewstep", "FewStepScheduler"]

diffusers resolves a component entry [module, class] to ``<component folder>/<module>.py`` when that
file exists, and a list-valued ``_class_name`` to ``<module>.py`` beside model_index.json; both need
``trust_remote_code=True``. Folders are written to a temporary sibling and renamed into place.
Text-to-image students with cross-attention also get ``nasa_fewstep.py`` beside ``model_index.json``: negative
prompts for one-step sampling (NASA), which the user imports from the folder; diffusers never loads it.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import fewstep_pipelines
from fewstep_pipelines.nasa_fewstep import cross_attention_layers

HERE = Path(fewstep_pipelines.__file__).resolve().parent
PIPELINE_FILE = "pipeline_fewstep.py"
SCHEDULER_FILE = "scheduling_fewstep.py"
EXPERTS_FILE = "experts_fewstep.py"
ROUTER_FILE = "router_fewstep.py"
NASA_FILE = "nasa_fewstep.py"     # negative prompts at inference, beside model_index.json
# custom model components -> the file defining them, copied into the component's folder
CUSTOM_MODELS = {"FewStepExperts": EXPERTS_FILE, "FewStepRouter": ROUTER_FILE}
SKIP_SUFFIXES = (".msgpack", ".onnx", ".onnx_data", ".h5", ".ckpt")   # other frameworks' weights


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
        elif component is not None:
            _custom_model(component, folder / name, index, name)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _custom_model(model, component_dir, index, name):
    """A custom model component (phased students' expert switch, MSD's student router): copy its file into its
    folder and point ``index[name]`` at it."""
    for class_name, file in CUSTOM_MODELS.items():
        if _is_a(model, class_name):
            shutil.copyfile(HERE / file, component_dir / file)
            index[name] = [Path(file).stem, class_name]


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
        _custom_model(model, folder / name, index, name)
    if any(cross_attention_layers(m) for m in models.values()):     # NASA needs cross-attention (not SD3/Flux)
        shutil.copyfile(HERE / NASA_FILE, folder / NASA_FILE)
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
