"""LoRA roles on one shared frozen backbone (student and critic adapters; the teacher is the base).

Adapters are injected with peft into any diffusers model (UNet2DModel has no diffusers adapter mixin, so
peft's ``inject_adapter_in_model`` is used directly). Switching roles sets peft layers' active-adapter and
disabled flags without peft's ``set_adapter``/``enable_adapters``, because those also flip
``requires_grad`` and would fight the training loop, which decides per turn what is trained.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_adapter(model: nn.Module, name: str, rank: int, targets=TARGETS) -> None:
    """Inject LoRA adapter ``name`` (rank r, alpha = r, Gaussian A and zero B: starts as the base model)."""
    import warnings

    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))
    with warnings.catch_warnings():   # a second adapter on one model is the point of lora mode
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)


def _layers(model: nn.Module):
    """The peft layers of ``model``. Cached per set of injected adapters: roles switch on every backbone call
    (and on every checkpointed block), and walking a large UNet's modules each time is not free."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(getattr(model, "peft_config", None) or ())
    cached = model.__dict__.get("_fewstep_lora_layers")
    if cached is None or cached[0] != key:
        cached = (key, [m for m in model.modules() if isinstance(m, BaseTunerLayer)])
        model.__dict__["_fewstep_lora_layers"] = cached
    return cached[1]


@contextmanager
def role(model: nn.Module, adapter: str | bool):
    """Run with only adapter ``adapter`` active, or with every adapter disabled when ``adapter`` is False."""
    layers = _layers(model)
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:
        if adapter is False:
            m._disable_adapters = True
        else:
            m._active_adapter, m._disable_adapters = [adapter], False
    try:
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


def snapshot(model: nn.Module) -> list:
    """Which adapter each peft layer of ``model`` runs right now (for ``restored``)."""
    return [(m, m._active_adapter, m._disable_adapters) for m in _layers(model)]


@contextmanager
def restored(state: list):
    """Run with the adapter roles of a ``snapshot``: gradient checkpointing recomputes a block in backward,
    long after the role it ran under in forward has been left, and must recompute it under the same one."""
    saved = [(m, m._active_adapter, m._disable_adapters) for m, _, _ in state]
    for m, active, disabled in state:
        m._active_adapter, m._disable_adapters = active, disabled
    try:
        yield
    finally:
        for m, active, disabled in saved:
            m._active_adapter, m._disable_adapters = active, disabled


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (peft names them ``...lora_A.<name>.weight``)."""
    tag = f".{name}."
    return [p for n, p in model.named_parameters() if tag in n]


def merged_weights(model: nn.Module, name: str) -> dict:
    """``module path -> W + delta`` (float32) of every layer adapter ``name`` adapts: the weights a plain copy of
    ``model`` takes there to run as the base with the adapter merged in (``merged_copy`` without a copy)."""
    layers = {id(m) for m in _layers(model)}
    with torch.no_grad():
        return {path: m.get_base_layer().weight.float() + m.get_delta_weight(name).float()
                for path, m in model.named_modules() if id(m) in layers and name in m.lora_A}


def adapter_state_dict(model: nn.Module, name: str, convert: bool = True) -> dict:
    """Adapter weights for ``save_lora_weights``: in diffusers' UNet LoRA key format (``...to_q.lora.down.weight``),
    or with ``convert=False`` in peft's (``...to_q.lora_A.weight``), which transformer LoRAs must use: the
    conversion renames only attention projections, and a half-renamed dict loads only partly."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=name)
    return convert_state_dict_to_diffusers(state) if convert else state


def merged_copy(model: nn.Module, name: str) -> nn.Module:
    """A plain copy of ``model`` with adapter ``name`` merged into the base weights and every peft layer
    removed: the fused student a stock diffusers pipeline loads."""
    import copy

    out = copy.deepcopy(model)
    for layer_name, module in list(out.named_modules()):
        if module in _layers(out):
            module.merge(adapter_names=[name])
            parent, _, child = layer_name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(out):       # instance attributes only: diffusers' ModelMixin declares them on the class
            delattr(out, attr)
    return out
