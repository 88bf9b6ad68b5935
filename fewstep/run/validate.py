"""``validate(cfg)``: every check of a run config that can be made before the teacher loads.

Each failure is one ``ConfigError`` naming the field, the bad value and the fix. The method's own checks
(``Method.validate``: a GAN weight without a head, a discriminator without real images, ...) run last.
"""
from __future__ import annotations

import math

from fewstep.errors import ConfigError
from fewstep.methods import method_class
from fewstep.run.config import RunConfig, flatten
from fewstep.training import optim

# field -> allowed values
CHOICES = {
    "model.mode": ("full", "lora"),
    "model.teacher_dtype": ("float32", "bfloat16"),
    "model.attention": ("sdpa", "xformers"),
    "data.source": ("digits", "prompts", "images"),
    "train.mixed_precision": ("no", "bf16"),
}
# field -> smallest allowed value
AT_LEAST = {
    "train.max_steps": 1, "train.grad_accum": 1, "train.log_every": 1, "train.sample_every": 1,
    "train.checkpoint_every": 1, "train.keep_last": 1, "train.keep_every": 0, "train.max_nonfinite": 1,
    "train.eval_samples": 10, "data.batch_size": 1, "data.resolution": 0, "data.num_frames": 0,
    "model.lora_rank": 1,
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Raise ``ConfigError`` for the first field of ``cfg`` that cannot work."""
    flat = flatten(cfg)
    for key, value in flat.items():     # nan / inf anywhere would train silently (or export a broken model)
        _require(not isinstance(value, float) or math.isfinite(value),
                 f"{key} {value} is not a finite number; give a finite value")
    for key, allowed in CHOICES.items():
        _require(flat[key] in allowed, f"{key} {flat[key]!r} is not valid; use {' or '.join(allowed)}")
    for key, low in AT_LEAST.items():
        _require(flat[key] >= low, f"{key} {flat[key]} must be at least {low}")
    t = cfg.train
    _require(0.0 <= t.ema_decay < 1.0, f"train.ema_decay {t.ema_decay} must be in [0, 1) (0 disables the EMA)")
    _require(t.max_grad_norm > 0, f"train.max_grad_norm {t.max_grad_norm} must be > 0")
    ts = cfg.model.student_timesteps
    _require(bool(ts) and all(b < a for a, b in zip(ts, ts[1:])) and min(ts) >= 0,
             f"model.student_timesteps {list(ts)} must be non-empty, >= 0 and strictly descending, e.g. 999,749,499,249")
    for name, o in cfg.optim.items():
        _require(o.lr > 0, f"optim.{name}.lr {o.lr} must be > 0")
        for beta in ("beta1", "beta2"):
            _require(0.0 <= getattr(o, beta) < 1.0, f"optim.{name}.{beta} {getattr(o, beta)} must be in [0, 1)")
        _require(o.weight_decay >= 0 and o.eps > 0 and o.warmup_steps >= 0,
                 f"optim.{name}: weight_decay {o.weight_decay} and warmup_steps {o.warmup_steps} must be >= 0, "
                 f"eps {o.eps} > 0")
        _require(o.kernel in optim.KERNELS, f"optim.{name}.kernel {o.kernel!r} is not valid; use "
                 f"{' or '.join(optim.KERNELS)}")
    d = cfg.data
    _require(d.source != "prompts" or bool(d.prompts), "data.source prompts needs data.prompts: a .txt file (one "
             "prompt a line), a .jsonl or a datasets folder")
    _require(d.source != "images" or bool(d.images), "data.source images needs data.images: a folder of RGB images "
             "(each caption in <name>.txt)")
    method = method_class(cfg.method_name)
    _require(isinstance(cfg.method, method.Config), f"the method section is a {type(cfg.method).__name__}, "
             f"not the {method.Config.__name__} of method {cfg.method_name!r}")
    method.validate(cfg.method, cfg.model, cfg.data)
