"""FewStepTimeOffset: a flow-map student's second time input, re-attached to a plain diffusers backbone.

A flow-map student ``F(x_t, t, r)`` (MeanFlow, arXiv 2505.13447; TwinFlow, arXiv 2512.05150) is its teacher's
backbone plus one small module, an embedding of the length of the jump ``delta = t - r`` (flow times in [0, 1]):

    e(delta) = W2 silu(W1 phi(delta) + b1) - (the same at delta = 0),
    phi(delta) = [cos, sin](delta_scale * delta * f_i),   f_i = max_period^(-i / half),  i < half = channels / 2,

added to the output of the backbone's timestep embedding (a diffusers ``TimestepEmbedding``; its module path is
``config.time_embedding``), so r enters the network where the timestep does. ``e(0) = 0``: the backbone alone is the
student at r = t.

The backbone stays a plain diffusers model in its own folder. This module lives beside the scheduler that samples
with it (``scheduler/time_offset/`` of a ``FewStepScheduler`` whose config records the flow map's (t, r) pairs): a
stock pipeline hands its backbone nothing but t, and only the scheduler knows the step count and hence r, so the
scheduler hooks this module onto the pipeline's backbone (``attach``) and says which (t, r) the call in flight has.

This file imports only the standard library, torch and diffusers so that it can be copied alone into an exported
folder (``time_offset/flowmap_fewstep.py``) and loaded from there.
"""

import math
import weakref

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class FewStepTimeOffset(ModelMixin, ConfigMixin):
    """``e(t - r)`` of width ``dim`` (the hooked ``TimestepEmbedding``'s output width)."""

    @register_to_config
    def __init__(self, dim: int = 32, channels: int = 256, hidden: int | None = None, max_period: float = 10000.0,
                 delta_scale: float = 1000.0, time_embedding: str = "time_embedding"):
        super().__init__()
        self.linear_1 = torch.nn.Linear(channels, hidden or dim)
        self.act = torch.nn.SiLU()
        self.linear_2 = torch.nn.Linear(hidden or dim, dim, bias=False)
        self._hooked = weakref.WeakSet()       # timestep embeddings this offset is hooked onto

    def forward(self, t: float, r: float) -> torch.Tensor:
        """``e(t - r)`` as a ``[1, dim]`` row; ``t - r`` and the sinusoids in float32 whatever the weights' dtype."""
        w = self.linear_1.weight
        delta = torch.tensor([t], dtype=torch.float32) - torch.tensor([r], dtype=torch.float32)
        both = torch.cat([delta, torch.zeros(1)]).to(w.device)           # the jump, and the diagonal r = t
        half = self.config.channels // 2
        freqs = torch.exp(-math.log(self.config.max_period) * torch.arange(half, device=w.device) / half)
        arg = self.config.delta_scale * both[:, None] * freqs[None]
        e = self.linear_2(self.act(self.linear_1(torch.cat([torch.cos(arg), torch.sin(arg)], 1).to(w.dtype))))
        return e[:1] - e[1:]

    def attach(self, model: torch.nn.Module, pair_of) -> None:
        """Hook onto ``model``'s timestep embedding: while ``pair_of()`` gives the (t, r) of the call in flight, its
        output becomes ``temb + e(t - r)`` (every row of the batch: one (t, r) per pipeline step); ``None`` leaves
        it as it is. Hooking the same embedding twice is a no-op."""
        module = model.get_submodule(self.config.time_embedding)
        if module in self._hooked:
            return
        self._hooked.add(module)

        def hook(_module, _inputs, out):
            pair = pair_of()
            if pair is None:
                return None
            if self.linear_1.weight.device != out.device:
                self.to(out.device)
            return out + self(*pair).to(out.dtype)

        module.register_forward_hook(hook)

    def hook_caller(self, scheduler, frame, pair_of):
        """Attach to every backbone (a component with the timestep embedding) of the pipeline whose method is on the
        call stack from ``frame`` up and whose ``scheduler`` is ``scheduler``; that pipeline, or None."""
        path = self.config.time_embedding
        for _ in range(CALLER_FRAMES):
            if frame is None:
                return None
            pipe = frame.f_locals.get("self")
            if pipe is not scheduler and getattr(pipe, "scheduler", None) is scheduler and hasattr(pipe, "components"):
                backbones = [m for m in pipe.components.values() if _has_submodule(m, path)]
                if not backbones:
                    raise ValueError(f"{type(pipe).__name__} holds no backbone with a {path!r} timestep embedding "
                                     "for this flow map's time offset.")
                for model in backbones:
                    self.attach(model, pair_of)
                return pipe
            frame = frame.f_back
        return None


CALLER_FRAMES = 8   # how far up the stack from set_timesteps the calling pipeline is looked for


def _has_submodule(model, path: str) -> bool:
    if not isinstance(model, torch.nn.Module):
        return False
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


