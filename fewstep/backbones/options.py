"""Memory and speed switches applied to the teacher's backbone before the student and critic are copied from
it (so all three share them): the attention backend and gradient checkpointing. Both go through diffusers'
own ``ModelMixin`` switches, so every backbone family gets them."""
from __future__ import annotations

import importlib.util
from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from fewstep.backbones import lora
from fewstep.errors import ConfigError


def xformers_problem() -> str | None:
    """Why xformers attention cannot be used here, or None when it can."""
    if importlib.util.find_spec("xformers") is None:
        return 'the xformers package is not installed (pip install "fewstep[xformers]", matching your torch build)'
    if not torch.cuda.is_available():
        return "xformers kernels need a CUDA GPU and none is visible"
    return None


def role_aware_checkpoint(model: torch.nn.Module):
    """torch's non-reentrant checkpoint, recomputing each block under the LoRA roles that were active when it
    ran forward. In LoRA mode student, critic and teacher share ``model`` and switch adapters per call, and
    backward runs after all of them: recomputing under whatever role is active then would give other
    activations (torch refuses: "a different number of tensors was saved"). Full mode has no adapters,
    so the snapshot is empty and this is the plain checkpoint."""
    def checkpoint_fn(block, *args, **kwargs):
        state = lora.snapshot(model)
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), lora.restored(state)), **kwargs)

    return checkpoint_fn


def apply(model: torch.nn.Module, cfg) -> None:
    """Switch ``model`` (a diffusers backbone) to ``cfg.attention`` and ``cfg.gradient_checkpointing``."""
    name = type(model).__name__
    if cfg.gradient_checkpointing:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"model.gradient_checkpointing true: {name} does not support gradient "
                              "checkpointing in this diffusers version; drop the flag")
        model.enable_gradient_checkpointing(gradient_checkpointing_func=role_aware_checkpoint(model))
    if cfg.attention == "xformers":
        problem = xformers_problem()
        if problem is not None:
            raise ConfigError(f"model.attention xformers: {problem}; use model.attention sdpa (the default, "
                              "PyTorch scaled_dot_product_attention)")
        try:
            model.enable_xformers_memory_efficient_attention()
        except (ValueError, NotImplementedError, ModuleNotFoundError) as e:
            raise ConfigError(f"model.attention xformers: {name} refused it ({' '.join(str(e).split())[:200]}); "
                              "use model.attention sdpa") from None
