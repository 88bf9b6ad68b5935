"""The wiring: teacher loading, the ``Parts`` a method builds itself from (student / critic / head in
full or LoRA mode), the one ``make_method`` every entry script uses, the batch source, the accelerator.

``full`` mode: frozen teacher (optionally bf16) plus trainable fp32 copies for student and critic.
``lora`` mode: one frozen base; student and critic are two peft adapters on it and the teacher is the
base with adapters disabled, so the backbone's weights are held once.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.backbones import adapter_for, lora
from fewstep.backbones import options as backbone_options
from fewstep.backbones.encoders import FAMILIES
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.heads import ConvHead
from fewstep.core.schedules import from_diffusers, prediction_type_of
from fewstep.core.timesteps import from_timesteps
from fewstep.digits import DIGITS_TEACHER
from fewstep.digits import t2i as digits_t2i
from fewstep.errors import ConfigError
from fewstep.methods import Method, method_class
from fewstep.run.config import ModelConfig, RunConfig
from fewstep.training.data import digits_source, prompt_source

MODEL_FOLDERS = ("unet", "transformer")


@dataclass
class Teacher:
    """A loaded teacher: its denoiser plus what export needs to rebuild a pipeline around a student."""

    denoiser: Denoiser
    path: Path
    folder: str                 # "unet" or "transformer"
    scheduler_config: dict
    pipe: object = None         # text-to-image teachers: the stock pipeline (text encoders, tokenizers, VAE)

    @property
    def pipeline_class(self) -> str:
        return type(self.pipe).__name__ if self.pipe is not None else ""


def _hub_cache(name: str) -> Path | None:
    """The local Hugging Face cache snapshot of hub id ``name`` (never a download), or None."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 (not cached, no hub library, malformed id: all mean "not here")
        return None


def teacher_path(name: str) -> Path:
    """Resolve ``model.teacher`` ("" = the bundled digits teacher; "digits_t2i" = the bundled text-to-image
    digits teacher, assembled with its pip-installed text encoder; a hub id = its local HF-cache copy) to a
    local diffusers directory."""
    path = Path(name) if name else DIGITS_TEACHER
    if path.is_dir():
        return path
    if name == digits_t2i.TEACHER_NAME:
        return digits_t2i.materialize()
    cached = _hub_cache(name)
    if cached is not None:
        return cached
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        raise ConfigError(f"teacher {name!r} is not a directory and not in the local Hugging Face cache; fewstep "
                          f"never downloads at run time: download it first (hf download {name} --local-dir "
                          f"<folder>) and set model.teacher <folder>")
    raise ConfigError(f"teacher {str(path)!r} is not a directory; give a local diffusers pipeline folder "
                      "(with scheduler/ and unet/ or transformer/), leave model.teacher empty for the "
                      "bundled digits teacher or name digits_t2i (no downloads happen at run time)")


def load_teacher(cfg: ModelConfig) -> Teacher:
    """Load the teacher's backbone and scheduler from a diffusers directory and wrap them in a Denoiser."""
    import diffusers

    path = teacher_path(cfg.teacher)
    folder = next((f for f in MODEL_FOLDERS if (path / f / "config.json").is_file()), None)
    sched_file = path / "scheduler" / "scheduler_config.json"
    if folder is None or not sched_file.is_file():
        raise ConfigError(f"teacher {str(path)!r} lacks unet/config.json (or transformer/config.json) and "
                          "scheduler/scheduler_config.json; point model.teacher at a saved diffusers pipeline")
    if (path / folder / "config.json").parent.parent.resolve() == digits_t2i.TEACHER_DIR.resolve():
        raise ConfigError(f"model.teacher {cfg.teacher!r} is the bundled text-to-image asset without its text "
                          f"encoder; name it instead: model.teacher {digits_t2i.TEACHER_NAME}")
    class_name = _read_json(path / folder / "config.json").get("_class_name")
    model_cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if model_cls is None:
        raise ConfigError(f"teacher backbone class {class_name!r} is not in this diffusers version")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.teacher_dtype]
    sched = _read_json(sched_file)
    pipe = _load_pipeline(path, dtype)
    if pipe is not None:
        model = getattr(pipe, folder)
    else:
        try:
            model = model_cls.from_pretrained(path, subfolder=folder, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:     # truncated or foreign weight files
            raise ConfigError(f"teacher {str(path / folder)!r}: its weights do not load ({_short(e)}); re-save or "
                              "re-download that folder") from None
    model.eval().requires_grad_(False)
    backbone_options.apply(model, cfg)     # before the student and critic are copied from it
    denoiser = Denoiser(adapter_for(model, prediction_type_of(sched)), from_diffusers(sched))
    return Teacher(denoiser, path, folder, sched, pipe)


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:240]


def _read_json(path: Path) -> dict:
    """A teacher's JSON file, or a one-line error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"teacher file {str(path)!r} is not valid JSON ({_short(e)}); re-save or re-download "
                          "the teacher folder") from None
    if not isinstance(data, dict):
        raise ConfigError(f"teacher file {str(path)!r} holds no JSON object; re-save or re-download the folder")
    return data


def _load_pipeline(path: Path, dtype):
    """The stock text-to-image pipeline of a teacher folder (its backbone becomes the teacher: one copy),
    or None for folders that hold no such pipeline (the class-conditional digits teacher)."""
    import diffusers

    index = path / "model_index.json"
    if not index.is_file():
        return None
    class_name = _read_json(index).get("_class_name")
    if not isinstance(class_name, str) or class_name not in FAMILIES:
        return None
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"teacher {str(path)!r}: {class_name}.from_pretrained failed "
                          f"({' '.join(str(e).split())[:300]})") from None
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def student_times(teacher: Teacher, cfg: ModelConfig) -> torch.Tensor:
    try:
        return from_timesteps(cfg.student_timesteps, teacher.denoiser.schedule)
    except ValueError as e:
        raise ConfigError(f"model.student_timesteps: {e}") from None


def _copy(teacher: Teacher, adapter=None) -> Denoiser:
    model = copy.deepcopy(teacher.denoiser.backbone.model).float().requires_grad_(True).train()
    return Denoiser(adapter_for(model, teacher.denoiser.prediction_type), teacher.denoiser.schedule, adapter)


def make_student(teacher: Teacher, cfg: ModelConfig, init_scale: float = 1.0) -> FewStepGenerator:
    """The student generator, initialized from the teacher (DMD2 section 5)."""
    t_list = student_times(teacher, cfg)
    if cfg.mode == "lora":
        return FewStepGenerator(_lora_role(teacher, "student", cfg.lora_rank), t_list, init_scale)
    return FewStepGenerator(_copy(teacher), t_list, init_scale)


def make_critic(teacher: Teacher, cfg: ModelConfig) -> Denoiser:
    """The fake-score network (critic), initialized from the teacher."""
    if cfg.mode == "lora":
        return _lora_role(teacher, "critic", cfg.lora_rank)
    return _copy(teacher)


def make_head(critic: Denoiser, cfg: ModelConfig):
    """A discriminator head on the critic's bottleneck, or None when ``model.gan_head`` is off."""
    return ConvHead(critic.backbone.feature_channels()) if cfg.gan_head else None


def _lora_role(teacher: Teacher, name: str, rank: int) -> Denoiser:
    """Add LoRA adapter ``name`` to the teacher's frozen base and return a Denoiser that activates it.

    The teacher denoiser is switched to ``adapter=False``: it runs the base with every adapter disabled.
    """
    model = teacher.denoiser.backbone.model
    lora.add_adapter(model, name, rank, teacher.denoiser.backbone.lora_targets)
    model.requires_grad_(False)
    for p in lora.adapter_parameters(model, name):
        p.data = p.data.float()       # trainable master weights stay fp32 over a bf16 base (peft casts inputs)
        p.requires_grad_(True)
    teacher.denoiser.adapter = False
    return Denoiser(teacher.denoiser.backbone, teacher.denoiser.schedule, adapter=name)


@dataclass
class Parts:
    """The networks a method builds itself from (``fewstep.methods.Parts``), made from a loaded teacher in
    the run's mode: full copies of its backbone, or LoRA roles on its one frozen base."""

    loaded: Teacher
    model: ModelConfig
    total_steps: int
    source: object = None       # the run's batch source: ``encode`` asks it for prompt conditions
    run_dir: str = ""           # train.output_dir (KD caches its teacher pairs there)

    @property
    def teacher(self) -> Denoiser:
        return self.loaded.denoiser

    @property
    def timesteps(self) -> tuple[int, ...]:
        return tuple(self.model.student_timesteps)

    @property
    def mode(self) -> str:
        return self.model.mode

    def student(self, init_scale: float = 1.0) -> FewStepGenerator:
        return make_student(self.loaded, self.model, init_scale)

    def critic(self) -> Denoiser:
        return make_critic(self.loaded, self.model)

    def head(self, critic: Denoiser):
        return make_head(critic, self.model)

    def encode(self, prompts: list[str]) -> Cond:
        if not callable(getattr(self.source, "cond", None)):
            raise ConfigError("this method conditions on prompts of its own, which needs a text-to-image teacher "
                              "and its prompt source (data.source prompts or images)")
        return Cond.cat(*[self.source.cond(p) for p in prompts])

    def adapter(self, name: str) -> Denoiser:
        return _lora_role(self.loaded, name, self.model.lora_rank)

    def prompts(self) -> list[str]:
        prompts = getattr(self.source, "prompts", None)
        if not prompts:
            raise ConfigError("this method partitions the training prompts, which needs a text-to-image teacher and "
                              "its prompt source (data.source prompts with data.prompts, or captioned images)")
        return list(prompts)


def make_method(cfg: RunConfig, teacher: Teacher, source=None) -> Method:
    """The method ``cfg.method_name`` built by its own ``build`` on networks made from ``teacher`` (and prompt
    conditions encoded by ``source``, the run's batch source): the one way every entry script (and test) builds
    a method."""
    parts = Parts(teacher, cfg.model, cfg.train.max_steps, source, cfg.train.output_dir)
    return method_class(cfg.method_name).build(cfg.method, parts)


def make_source(cfg: RunConfig, teacher: Teacher):
    """The batch source a config asks for."""
    if cfg.data.source == "digits":
        model_cfg = teacher.denoiser.backbone.model.config
        if getattr(model_cfg, "num_class_embeds", None) is None:
            raise ConfigError("data.source digits needs a class-conditional teacher (UNet2DModel with "
                              "num_class_embeds); use a prompt source for text-to-image teachers")
        return digits_source(cfg.data.batch_size, cfg.train.seed, model_cfg.sample_size)
    if cfg.data.source in ("prompts", "images"):
        if teacher.pipe is None:
            raise ConfigError(f"data.source {cfg.data.source} needs a text-to-image teacher: a diffusers folder "
                              f"whose model_index.json names one of {', '.join(sorted(FAMILIES))}; "
                              f"{str(teacher.path)!r} holds none (class teachers take data.source digits)")
        return prompt_source(cfg.data, teacher.pipe, cfg.train.seed)
    raise ConfigError(f"data.source {cfg.data.source!r} is not available; use digits, prompts or images")


def accelerator(mixed_precision: str, project_dir: str):
    """An accelerate Accelerator with tensorboard logging and unused-parameter-tolerant DDP (each turn
    touches a subset of the method's parameters)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    log_with = None
    try:
        import tensorboard  # noqa: F401
        log_with = "tensorboard"
    except ImportError:
        pass
    return Accelerator(mixed_precision=mixed_precision, log_with=log_with,
                       project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=f"{project_dir}/logs"),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
