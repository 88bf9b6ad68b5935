"""The flow-map student shared by MeanFlow and TwinFlow: a two-time denoiser ``F(x_t, t, r)`` (``core.two_time``)
sampled by MeanFlow's eq. 4 (Geng et al., arXiv 2505.13447), ``z_r = z_t - (t - r) u(z_t, r, t)``, at any step count,
and its two exports.

- ``flow_map()``: one plain diffusers copy of the backbone plus the offset embedding as data (``FlowMap``), which the
  exported ``FewStepScheduler`` hooks onto the pipeline's backbone: every step count 1 .. ``export_steps``;
- ``plain()`` (``folded``): step k's constant offset ``e(t_k - r_k)`` folded into the bias of the time embedding's
  last linear layer of its own plain copy, one expert per trained step (at most ``MAX_STEPS``).

``check_foldable`` refuses the folded export for a backbone whose time embedding has no plain last bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.adapter import adapter_for
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.flow_time import FlowTime, velocity_of
from fewstep.core.generator import FewStepGenerator
from fewstep.core.schedules import bcast
from fewstep.core.timesteps import ddim_grid
from fewstep.core.two_time import PREFIX, embedding_of
from fewstep.errors import ConfigError

EXPORTS = ("flow_map", "folded")
MAX_STEPS = 4       # the folded export: one expert per step, and the exported class pipeline holds at most four
EXPORT_STEPS = 8    # the flow-map export samples every step count from 1 to this (or to K, if more)


@dataclass
class FlowMap:
    """A flow-map export, as data: the offset embedding (``two_time.TimeOffsetEmbedding.config()``, the module path
    it hooks, its float32 weights) and, for n = 1, 2, ..., the n-step timesteps and flow-time (t, r) pairs."""

    time_embedding: str
    offset_config: dict
    offset_state: dict
    timesteps: list
    pairs: list


class MeanFlowStudent(FewStepGenerator):
    """The two-time student: samples by eq. 4 at any step count; ``flow_map()`` / ``plain()`` are its two exports
    (``export_as``: which one ``fewstep.run.export`` writes, folded unless a method asks for the flow map;
    ``export_steps``: the flow map's largest step count)."""

    def __init__(self, denoiser: Denoiser, t_list, ft: FlowTime, export_as: str = "folded",
                 export_steps: int = EXPORT_STEPS):
        super().__init__(denoiser, t_list, renoise="ddim" if len(t_list) > 1 else "fresh")
        if export_as not in EXPORTS:
            raise ValueError(f"export_as {export_as!r}: use one of {EXPORTS}")
        self.ft, self.export_as, self.export_steps = ft, export_as, max(int(export_steps), self.K)

    def times(self, steps: int | None = None) -> Tensor:
        """The process times of an n-step sampler: the t-list for n = K (None), else the teacher's trailing DDIM
        grid of n times."""
        n = self.K if steps is None else int(steps)
        if n < 1:
            raise ValueError(f"a MeanFlow student samples 1 or more steps, not {steps}")
        return self.t_list if n == self.K else ddim_grid(self.denoiser.schedule, n)[:-1].to(self.t_list.device)

    def pairs(self, steps: int | None = None) -> tuple[Tensor, Tensor]:
        """The flow times (t_k, r_k = t_{k+1}) of each of ``steps`` steps (default K), t_n = 0, float64 (kept on the
        t-list's device)."""
        s = self.times(steps)
        t = self.ft.of(s.cpu()).to(s.device)
        return t, torch.cat([t[1:], t.new_zeros(1)])

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Cond, generator=None, steps: int | None = None) -> Tensor:
        t, r = self.pairs(steps)
        z = noise.double() / bcast(self.ft.scale(t[:1]), noise.double())      # the input noise is x_s at s_0
        for k in range(len(t)):
            tk, rk = (v[k].expand(len(z)) for v in (t, r))
            z = z - bcast(tk - rk, z) * velocity_of(self.denoiser, self.ft, z, tk, cond, rk)
        return z.to(noise.dtype)

    def merged(self) -> Denoiser:
        """The denoiser whose weights the exports copy: the student's own (a LoRA subclass merges its adapter)."""
        if isinstance(self.denoiser.adapter, str):
            raise TypeError("a LoRA flow-map student exports a merged copy: override MeanFlowStudent.merged")
        return self.denoiser

    def _plain(self, d: Denoiser, bias_shift: Tensor | None = None) -> Denoiser:
        """A plain diffusers copy of d's backbone without the offset embedding (``bias_shift`` added to the time
        embedding's last bias), on d's device and in its dtype."""
        model = d.backbone.model
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{PREFIX}.")}
        if bias_shift is not None:
            bias = f"{d.backbone.time_embedding}.linear_2.bias"
            state[bias] = state[bias] + bias_shift.to(state[bias].dtype)
        copy_ = type(model).from_config(model.config)
        copy_.load_state_dict(state)
        ref = model.get_submodule(d.backbone.time_embedding).linear_2.weight
        return Denoiser(adapter_for(copy_.to(ref.device, ref.dtype).eval(), d.prediction_type), d.schedule)

    def plain(self) -> FewStepGenerator:
        """The folded export: step k's ``e(t_k - r_k)`` folded into the bias of the time embedding's last linear layer
        of its own plain copy (the module docstring)."""
        d = self.merged()
        embedding = embedding_of(d.backbone.model)
        t, r = self.pairs()
        device = next(embedding.parameters()).device
        with torch.no_grad():       # t - r as ``offset`` forms it during sampling (float32 times, then the difference)
            shifts = [embedding((t[k].float() - r[k].float()).reshape(1).to(device))[0] for k in range(self.K)]
        experts = [self._plain(d, shift) for shift in shifts]
        return FewStepGenerator(experts, self.t_list, renoise=self.renoise, phase_of_step=list(range(self.K)))

    def flow_map(self) -> tuple[FewStepGenerator, FlowMap]:
        """The flow-map export: one plain copy of the backbone (DDIM jumps on the t-list, as data) and the
        ``FlowMap`` that makes it sample every step count 1 .. ``export_steps``."""
        d = self.merged()
        embedding = embedding_of(d.backbone.model)
        state = {k: v.detach().float().cpu().clone() for k, v in embedding.state_dict().items()}
        steps = range(1, self.export_steps + 1)
        timesteps = [[int(v) if float(v).is_integer() else float(v)
                      for v in d.schedule.timestep(self.times(n).cpu()).tolist()] for n in steps]
        pairs = [[[float(a), float(b)] for a, b in zip(*self.pairs(n))] for n in steps]
        spec = FlowMap(d.backbone.time_embedding, embedding.config(), state, timesteps, pairs)
        return FewStepGenerator(self._plain(d), self.t_list, renoise="ddim"), spec


def check_foldable(backbone) -> None:
    module = backbone.model.get_submodule(backbone.time_embedding)
    if getattr(module, "post_act", None) is not None or module.linear_2.bias is None:
        raise ConfigError(f"{type(backbone.model).__name__}'s time embedding has no plain last bias to fold the "
                          "offset of t - r into (post_act or bias=False); export it as a flow map "
                          "(method.export flow_map)")
