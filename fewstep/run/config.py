"""Typed run configuration and dotted CLI overrides (checks: ``validate``; help: ``help``).

Configs are nested dataclasses; presets (``presets.py``) are functions returning a full ``RunConfig``;
``--section.field value`` (or ``--section.field=value``) overrides one field with the value coerced to
the field's type. Every mistake raises ``ConfigError`` with a one-line message naming the value and the
fix; entry scripts turn it into exit code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field

from fewstep.errors import ConfigError


@dataclass
class ModelConfig:
    teacher: str = ""                              # diffusers directory or hub id; "" = bundled digits teacher
    mode: str = "full"                             # full: separate copies; lora: one frozen base + adapters
    lora_rank: int = 16
    student_timesteps: tuple[int, ...] = (999,)    # the student's t-list in the teacher's timestep units
    teacher_dtype: str = "float32"                 # float32 | bfloat16 (frozen teacher storage)
    gan_head: bool = True                          # build a discriminator head on the critic's bottleneck
    attention: str = "sdpa"                        # sdpa (PyTorch) | xformers (CUDA, pip install "fewstep[xformers]")
    gradient_checkpointing: bool = False           # recompute backbone activations in backward (less memory)


@dataclass
class DataConfig:
    source: str = "digits"                         # digits: class labels + real digits; prompts: text-to-image
    batch_size: int = 32                           # per process, per micro-batch
    prompts: str = ""                              # prompts: .txt (one a line), .jsonl, or a datasets folder
    resolution: int = 0                            # square image size in pixels (0: the pipeline's default)
    num_frames: int = 0                            # video teachers (Wan): frames (0: the pipeline's default)
    cache_embeddings: str = ""                     # .pt file caching prompt embeddings (and image latents)
    images: str = ""                               # folder of real RGB images for GAN/consistency terms


@dataclass
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    kernel: str = "auto"      # AdamW implementation: auto (fused where torch has it, else foreach), fused, foreach, loop


@dataclass
class TrainConfig:
    output_dir: str = "runs/dmd2_digits"
    max_steps: int = 1000                          # optimizer steps of the fastest turn (critic for DMD2)
    seed: int = 0
    grad_accum: int = 1                            # micro-batches per update, per turn
    max_grad_norm: float = 10.0
    ema_decay: float = 0.99                        # student EMA; 0 disables it
    log_every: int = 10
    sample_every: int = 250
    checkpoint_every: int = 250
    keep_last: int = 2
    keep_every: int = 0                            # also keep every M-th step's checkpoint (0: none)
    max_nonfinite: int = 5                         # stop after this many non-finite updates in a row
    mixed_precision: str = "no"                    # no | bf16
    overwrite: bool = False                        # start afresh in an output_dir that holds another run
    evaluate: bool = True                          # write metrics.json after training (digits)
    eval_samples: int = 2000


@dataclass
class RunConfig:
    method_name: str
    method: typing.Any
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: dict = field(default_factory=lambda: {"student": OptimConfig(), "critic": OptimConfig()})
    preset: str = ""

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# fields that may change between a run and its resume (the folder's path: a moved or copied run resumes too)
RESUME_SAFE = ("train.output_dir", "train.max_steps", "data.batch_size", "train.overwrite", "train.evaluate", "train.eval_samples", "train.log_every",
               "train.sample_every", "train.checkpoint_every", "train.keep_last", "train.keep_every",
               "train.max_nonfinite")


def _coerce(raw: str, typ, key: str):
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            low = raw.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if typ in (int, float, str):
            return typ(raw)
        if origin is tuple:
            inner = typing.get_args(typ)[0]
            parts = [p for p in raw.strip("[]() ").replace(",", " ").split()]
            return tuple(inner(p) for p in parts)
    except ValueError:
        pass
    else:
        raise ConfigError(f"--{key}: unsupported field type {typ}")
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"--{key} {raw!r} is not a valid {name}; example: --{key} {_example(typ)}")


def _example(typ) -> str:
    return {bool: "true", int: "10", float: "0.5", str: "text"}.get(typ, "999,749,499,249")


def _fields(obj) -> dict[str, tuple[typing.Any, typing.Any]]:
    """name -> (type, value) of a dataclass instance or the entries of an optimizer dict."""
    if isinstance(obj, dict):
        return {k: (OptimConfig, v) for k, v in obj.items()}
    hints = typing.get_type_hints(type(obj))
    return {f.name: (hints[f.name], getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def flatten(cfg) -> dict[str, typing.Any]:
    """Dotted key -> value for every leaf field of a config (``RunConfig`` or a section of one)."""
    return flat_dict(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg)


def set_override(cfg: RunConfig, key: str, raw: str) -> None:
    """Apply ``--key raw`` to ``cfg`` in place, or raise ConfigError naming the key and close matches."""
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        fields_ = _fields(node)
        if part not in fields_ or part in ("method_name", "preset"):
            known = list(flatten(cfg))
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"did you mean {', '.join('--' + c for c in close)}?" if close else "see --help for every field"
            raise ConfigError(f"unknown option --{key}; {hint}")
        typ, value = fields_[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(value) or isinstance(value, dict):
                raise ConfigError(f"--{key} is a section; set one of its fields, e.g. --{key}.{next(iter(_fields(value)))}")
            new = _coerce(raw, typ, key)
            if isinstance(node, dict):
                raise ConfigError(f"--{key}: give a field, e.g. --{key}.lr")
            setattr(node, part, new)
        else:
            node = value


def parse(argv: list[str], presets: dict, default_preset: str) -> tuple[RunConfig, bool]:
    """``[--preset NAME] [--dry-run] [--section.field VALUE ...]`` -> (config, dry_run)."""
    argv = list(argv)
    name, dry, pairs = default_preset, False, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --train.max_steps 100")
        key, eq, val = arg[2:].partition("=")
        if key == "dry-run":
            dry = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} <value>")
            val, i = argv[i + 1], i + 1
        i += 1
        if key == "preset":
            name = val
        else:
            pairs.append((key, val))
    if name not in presets:
        close = difflib.get_close_matches(name, list(presets), n=3)
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(presets))}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    cfg = presets[name]()
    cfg.preset = name
    for key, val in pairs:
        set_override(cfg, key, val)
    return cfg, dry


def diff(a: dict, b: dict) -> list[str]:
    """Dotted keys whose values differ between two flattened configs, ignoring resume-safe fields."""
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in RESUME_SAFE and a.get(k) != b.get(k)]


def flat_dict(nested: dict, prefix: str = "") -> dict:
    """Dotted key -> value of a config as saved in ``config.json`` (``RunConfig.to_dict``)."""
    out = {}
    for k, v in nested.items():
        if k in ("method_name", "preset") and not prefix:
            continue
        if isinstance(v, dict):
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
