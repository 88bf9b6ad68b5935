"""Whole (unsharded) training state under FSDP2, so a checkpoint holds every parameter and the full
optimizer state whatever the number of processes that wrote or reads it.

Under FSDP2 (``fully_shard``, accelerate's ``fsdp_version: 2``) every parameter is a ``DTensor`` holding one
shard per rank, and an optimizer's state is sharded the same way. ``module.state_dict()`` on rank 0 would
save rank 0's shards only, the failure behind runs that cannot resume. The functions here gather with
``torch.distributed.checkpoint.state_dict`` (``full_state_dict=True``, offloaded to CPU on rank 0) and
scatter back on load; optimizer state is keyed by parameter name, so it does not depend on how
parameters were grouped or sharded. Every ``gather_*`` is a collective: call it on all ranks.
Unsharded modules (one process, DDP) never come here: their plain ``state_dict()`` is already whole.
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
SCATTER = StateDictOptions(full_state_dict=True)


def is_sharded(module: torch.nn.Module) -> bool:
    """True when any parameter of ``module`` is a DTensor (FSDP2 / fully_shard)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def init_sharded(root: torch.nn.Module, params: dict) -> None:
    """Initialize FSDP2's per-group state while every trainable parameter requires grad.

    FSDP2 fixes each parameter group's gradient dtype at the group's first forward, from the parameters
    that require grad at that moment; in torch before 2.14 a group with none (the student's blocks while
    the critic turn runs first) gets no dtype and its later bf16-reduced gradients cannot be assigned to
    its fp32 parameters. Initializing once up front, with all turns' parameters trainable, avoids that.
    """
    for ps in params.values():
        for p in ps:
            p.requires_grad_(True)
    get_state = getattr(root, "_get_fsdp_state", None)
    if get_state is not None:
        get_state()._lazy_init()


def gather_module(module: torch.nn.Module) -> dict:
    """The full state dict of ``module`` on rank 0 (CPU tensors); an empty dict on other ranks."""
    return get_model_state_dict(module, options=GATHER)


def scatter_module(module: torch.nn.Module, state: dict) -> None:
    """Load a full state dict (present on every rank) into a sharded ``module``: each rank keeps its shard."""
    set_model_state_dict(module, state, options=SCATTER)


def gather_optimizer(root: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The full state of ``opt`` (whose parameters live under ``root``), keyed by parameter name, on rank 0."""
    return get_optimizer_state_dict(root, opt, options=GATHER)


def scatter_optimizer(root: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(root, opt, state, options=SCATTER)
