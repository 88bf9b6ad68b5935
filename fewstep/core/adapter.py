"""The backbone adapter interface the ``Denoiser`` wraps: one uniform call signature over model families.

An adapter knows the model's call signature and time convention, nothing about losses (k-diffusion's
``get_eps`` idea). Feature taps for discriminator heads use forward hooks, never patched forwards. The
concrete adapters, one per diffusers family, live in ``fewstep.backbones``; core knows none of them.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

from torch import Tensor, nn

from fewstep.core.conditioning import Cond


class BackboneAdapter(nn.Module):
    """Calls one diffusers model as ``raw = adapter(x_t, timestep, cond)``.

    ``timestep`` is the value a stock diffusers pipeline passes (``schedule.timestep(t)``); an adapter
    whose model expects another scale converts it (Flux divides by 1000).
    """

    feature_modules: tuple[str, ...] = ()   # submodules tapped for GAN heads, e.g. ("mid_block",)
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")   # attention projections
    time_embedding: str | None = None   # submodule whose output is the timestep embedding (two_time hooks it)

    def __init__(self, model: nn.Module, prediction_type: str):
        super().__init__()
        self.model = model
        self.prediction_type = prediction_type

    def role(self, adapter: str | bool | None):
        """A context in which the model runs as LoRA role ``adapter`` (None: the model as it is). The base
        interface has no adapters; ``fewstep.backbones`` implements roles with peft."""
        if adapter is None:
            return nullcontext()
        raise NotImplementedError(f"{type(self).__name__} has no LoRA roles (asked for {adapter!r})")

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of LoRA adapter ``name`` on this backbone."""
        raise NotImplementedError(f"{type(self).__name__} has no LoRA adapters (asked for {name!r})")

    def merged_weights(self, name: str) -> dict[str, Tensor]:
        """``module path -> weight`` (float32) of every module LoRA adapter ``name`` adapts, with the adapter merged
        into the base weight: what a plain copy of the model takes there to run as base + adapter."""
        raise NotImplementedError(f"{type(self).__name__} has no LoRA adapters (asked for {name!r})")

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def forward(self, x_t: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def cast(self, v: Tensor | None, like: Tensor) -> Tensor | None:
        """A floating cond tensor in the backbone's dtype on ``like``'s device (stock pipelines cast the
        prompt embeddings to the transformer's dtype); masks and ids keep their dtype."""
        if v is None:
            return None
        return v.to(like.device, self.dtype) if v.is_floating_point() else v.to(like.device)

    def model_timestep(self, timestep):
        """The timestep value the model itself receives for a scheduler timestep (what the stock pipeline passes
        it): the same for most families; Flux divides by 1000, Sana multiplies by ``timestep_scale``."""
        return timestep

    def feature_channels(self) -> int:
        """Channels of the last tapped feature (sizes the discriminator head)."""
        raise NotImplementedError

    def feature_map(self, out) -> Tensor:
        """A tapped module's output as a feature map ``[B, C, *spatial]``; a tuple gives its first tensor
        (UNet blocks). Transformer adapters override this to pick the image tokens and lay them on the grid."""
        return out[0] if isinstance(out, tuple) else out

    @contextmanager
    def tap(self, stop: bool = False):
        """Collect the outputs of ``feature_modules`` (as ``feature_map``s) during the forward passes run
        inside the block. ``stop``: the last tapped module ends the pass by raising ``FeaturesTaken`` (the
        caller wanted only the features; ``Denoiser.features`` catches it)."""
        feats: list[Tensor] = []
        hooks = []
        last = len(self.feature_modules) - 1

        def hook(i, out):
            feats.append(self.feature_map(out))
            if stop and i == last:
                raise FeaturesTaken

        for i, name in enumerate(self.feature_modules):
            module = self.model.get_submodule(name)
            hooks.append(module.register_forward_hook(lambda _m, _i, out, i=i: hook(i, out)))
        try:
            yield feats
        finally:
            for h in hooks:
                h.remove()

    def can_stop_early(self) -> bool:
        """Whether a pass may end at the tapped module: not when the model's parameters are sharded (FSDP's
        hooks must see every module's forward end) or its blocks are gradient-checkpointed (the recomputation
        replays whole blocks)."""
        p = next(self.model.parameters(), None)
        return p is not None and not hasattr(p, "full_tensor") and \
            not getattr(self.model, "is_gradient_checkpointing", False)


class FeaturesTaken(Exception):
    """Ends a forward pass at its last tapped module (``BackboneAdapter.tap(stop=True)``)."""


#: diffusers class name -> adapter class; ``fewstep.backbones`` registers one per family
ADAPTERS: dict[str, type[BackboneAdapter]] = {}


def register_adapter(class_name: str, adapter: type[BackboneAdapter]) -> None:
    """Make ``adapter_for`` wrap models of class ``class_name`` (or a subclass) in ``adapter``."""
    ADAPTERS[class_name] = adapter


def adapter_for(model, prediction_type: str) -> BackboneAdapter:
    """Wrap a diffusers model in the adapter registered for its family (along its class's MRO)."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model, prediction_type)
    raise ValueError(f"no fewstep adapter for {type(model).__name__}; supported backbones: "
                     f"{', '.join(sorted(ADAPTERS))}")
