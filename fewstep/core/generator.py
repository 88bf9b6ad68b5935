"""The few-step student: one or more denoisers (experts) evaluated on an explicit t-list.

Sampling is "predict x0, then re-noise to the next time" (DMD2 arXiv 2405.14867 section 4.5; the
multistep consistency sampler of LCM arXiv 2310.04378 alg. 1), or the deterministic DDIM jump between
listed times (phased consistency models, arXiv 2405.18407). Consistency students read x0 through LCM's
boundary scalings ``f(x, t) = c_skip x + c_out x0``; a phased student (Phased DMD, arXiv 2510.27684) runs
the expert of each step's phase. All of it is described as data by ``Sampling``, which ``fewstep.run.export``
alone turns into a diffusers scheduler and pipeline, and which ``save_pretrained`` writes beside the weights.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fewstep.core.adapter import adapter_for
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.schedules import NoiseSchedule, bcast, from_diffusers

SIGMA_DATA = 0.5          # LCM's boundary scalings (LCMScheduler's sigma_data)
RENOISE = ("fresh", "ddim")
SUBSETS = ("round", "floor")
CONFIG_NAME = "generator_config.json"


def subset_indices(K: int, n: int, rule: str = "round") -> list[int]:
    """Which of K trained steps an n-step call uses: ``round`` (FewStepScheduler) or ``floor`` (LCMScheduler)
    of ``linspace(0, K, n, endpoint=False)``."""
    if not 1 <= n <= K:
        raise ValueError(f"num_inference_steps={n} but the student was trained for {K} step(s); use 1..{K}")
    grid = np.linspace(0, K, n, endpoint=False)
    return [int(i) for i in (np.floor(grid) if rule == "floor" else np.round(grid))]


def ddim_step(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, s: Tensor, x0: Tensor) -> Tensor:
    """DDIM (eta = 0) from ``(x_t, t)`` to time s with the x0 estimate ``x0``: ``alpha_s x0 + sigma_s eps``."""
    eps = (x_t - bcast(schedule.alpha(t), x_t) * x0) / bcast(schedule.sigma(t), x_t).clamp_min(1e-12)
    return bcast(schedule.alpha(s), x0) * x0 + bcast(schedule.sigma(s), x0) * eps


@dataclass(frozen=True)
class Sampling:
    """How a student samples, as data: the description an export turns into a scheduler and pipeline.

    ``timesteps``: the descending t-list in the teacher's timestep units; ``init_scale``: factor on the unit
    input noise (SiD's ``sigma(t_init)``); ``renoise``: ``fresh`` noise after each x0 or the ``ddim`` jump;
    ``timestep_scaling``: LCM boundary scalings at ``tau = timestep * timestep_scaling`` (0: none);
    ``subset``: how fewer steps pick from the list; ``phase_of_step``: expert index of each step (one expert
    when every entry is 0); ``expert_boundaries``: timesteps at which the next expert takes over.
    """

    timesteps: tuple[float, ...]
    init_scale: float = 1.0
    renoise: str = "fresh"
    timestep_scaling: float = 0.0
    subset: str = "round"
    phase_of_step: tuple[int, ...] = ()
    expert_boundaries: tuple[int, ...] = field(default=())

    @property
    def K(self) -> int:
        return len(self.timesteps)

    @property
    def experts(self) -> int:
        return max(self.phase_of_step, default=0) + 1


class FewStepGenerator(nn.Module):
    """Student generator ``G(noise, cond)`` over the descending time list ``t_list`` (t = 1 is noise).

    ``experts`` are one denoiser, or one per phase with ``phase_of_step`` giving each step's expert; see
    ``Sampling`` for ``init_scale``, ``renoise``, ``timestep_scaling`` and ``subset``.
    """

    def __init__(self, experts: Denoiser | list[Denoiser], t_list, init_scale: float = 1.0, *,
                 phase_of_step=None, renoise: str = "fresh", timestep_scaling: float = 0.0, subset: str = "round"):
        super().__init__()
        experts = [experts] if isinstance(experts, Denoiser) else list(experts)
        self.denoiser = experts[0]
        # the further experts of a phased student; expert 0 is registered once, as ``denoiser``
        self.later_experts = nn.ModuleList(experts[1:])
        self.register_buffer("t_list", torch.as_tensor(t_list, dtype=torch.float32).flatten(), persistent=False)
        self.phase_of_step = list(phase_of_step) if phase_of_step is not None else [0] * self.K
        if len(self.phase_of_step) != self.K or sorted(set(self.phase_of_step)) != list(range(len(experts))):
            raise ValueError(f"phase_of_step {self.phase_of_step} must give each of the {self.K} steps one of "
                             f"the {len(experts)} experts, every expert at least once")
        if renoise not in RENOISE or subset not in SUBSETS:
            raise ValueError(f"renoise {renoise!r} / subset {subset!r}: use one of {RENOISE} / {SUBSETS}")
        self.init_scale, self.renoise, self.subset = float(init_scale), renoise, subset
        self.timestep_scaling = float(timestep_scaling)

    # ------------------------------------------------------------------ structure
    @property
    def K(self) -> int:
        return len(self.t_list)

    @property
    def experts(self) -> list[Denoiser]:
        return [self.denoiser, *self.later_experts]

    @property
    def P(self) -> int:
        return 1 + len(self.later_experts)

    def steps_of(self, p: int) -> list[int]:
        return [i for i, q in enumerate(self.phase_of_step) if q == p]

    def interval(self, p: int) -> tuple[float, float]:
        """``(s, e)``: phase p's lower edge (the next phase's first time, 0 for the last) and upper edge."""
        e = float(self.t_list[self.steps_of(p)[0]])
        return (float(self.t_list[self.steps_of(p + 1)[0]]) if p + 1 < self.P else 0.0), e

    def expert_boundaries(self) -> list[int]:
        """Timesteps at which the sampler switches to the next expert (each later phase's first time)."""
        s = self.denoiser.schedule
        return [int(s.timestep(self.interval(p)[1])) for p in range(1, self.P)]

    def sampling(self) -> Sampling:
        """This student's sampler as data (what export and ``save_pretrained`` write)."""
        ts = self.denoiser.schedule.timestep(self.t_list.cpu())
        ts = tuple(int(v) if float(v).is_integer() else float(v) for v in ts.tolist())
        return Sampling(ts, self.init_scale, self.renoise, self.timestep_scaling, self.subset,
                        tuple(self.phase_of_step), tuple(self.expert_boundaries()))

    # ------------------------------------------------------------------ one step
    def x0(self, denoiser: Denoiser, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The student's x0 at ``(x, t)`` through ``denoiser``: with LCM's boundary scalings
        ``c_skip = sigma_data^2 / (tau^2 + sigma_data^2)``, ``c_out = tau / sqrt(tau^2 + sigma_data^2)``,
        ``tau = timestep(t) * timestep_scaling`` when ``timestep_scaling`` > 0 (so ``f(x, 0) = x``)."""
        x0 = denoiser(x, t, cond)
        if not self.timestep_scaling:
            return x0
        tau = self.denoiser.schedule.timestep(t).to(x.device) * self.timestep_scaling
        c_skip = SIGMA_DATA ** 2 / (tau ** 2 + SIGMA_DATA ** 2)
        c_out = tau / (tau ** 2 + SIGMA_DATA ** 2).sqrt()
        return bcast(c_skip, x) * x + bcast(c_out, x) * x0

    def jump(self, denoiser: Denoiser, x: Tensor, t: Tensor, s: Tensor, cond: Cond) -> Tensor:
        """``F_s(x, t)``: the DDIM jump with the student's x0 onto time s (s = 0: x0 itself)."""
        x0 = self.x0(denoiser, x, t, cond)
        return torch.where(bcast(s, x) > 0, ddim_step(self.denoiser.schedule, x, t, s, x0), x0)

    def step(self, x: Tensor, i: int, cond: Cond) -> Tensor:
        """x0 predicted at the i-th time of the list, by the expert of its phase."""
        t = self.t_list[i].to(x.device).expand(len(x))
        return self.x0(self.experts[self.phase_of_step[i]], x, t, cond)

    def add_noise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Re-noise x0 to time t: ``alpha_t x0 + sigma_t eps``."""
        return self.denoiser.schedule.add_noise(x0, eps, t)

    # ------------------------------------------------------------------ chains
    def forward(self, noise: Tensor, cond: Cond, k: int = 0, eps_fn=None) -> tuple[Tensor, Tensor, int]:
        """Backward simulation (DMD2 section 4.5): run steps 0..k-1 without gradient from fresh noise,
        then the k-th step with gradient. ``eps_fn(i)`` gives the re-noising draw after step i (default
        ``randn_like``). Returns ``(x0, x_k, k)``: the trained output and its input."""
        x = noise * self.init_scale
        if k:
            with torch.no_grad():
                for i in range(k):
                    eps = eps_fn(i) if eps_fn is not None else torch.randn_like(x)
                    x = self.add_noise(self.step(x, i, cond), self.t_list[i + 1].expand(len(x)), eps)
        return self.step(x, k, cond), x, k

    def indices(self, n: int) -> list[int]:
        """Which trained steps an n-step call uses (the exported scheduler's rule)."""
        return subset_indices(self.K, n, self.subset)

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Cond, generator: torch.Generator | None = None,
               steps: int | None = None) -> Tensor:
        """Full sampling chain; re-noising draws ``randn(x.shape, generator)`` exactly as the exported
        scheduler's ``step`` does, so both give the same images for the same generator."""
        idx = self.indices(steps or self.K)
        x = noise * self.init_scale
        for j, i in enumerate(idx):
            t = self.t_list[i].to(x.device).expand(len(x))
            last = j == len(idx) - 1
            if self.renoise == "ddim":
                s = torch.zeros_like(t) if last else self.t_list[idx[j + 1]].to(x.device).expand(len(x))
                x = self.jump(self.experts[self.phase_of_step[i]], x, t, s, cond)
                continue
            x0 = self.step(x, i, cond)
            if last:
                return x0
            # drawn on the generator's device, then moved (diffusers' randn_tensor does the same), so a CPU
            # generator gives the same images on every device
            gen_device = generator.device if generator is not None else x.device
            eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
            x = self.add_noise(x0, self.t_list[idx[j + 1]].expand(len(x)), eps)
        return x

    # ------------------------------------------------------------------ diffusers-style save / load
    def save_config(self, folder: str | Path, experts: list[str]) -> Path:
        """Write ``generator_config.json``: the ``Sampling``, the prediction type, the noise process's scheduler
        config and the subfolders (diffusers model folders) that hold the experts' backbones."""
        schedule = self.denoiser.schedule
        if getattr(schedule, "config", None) is None:
            raise ValueError("this student's noise process was not built from a diffusers scheduler config "
                             "(schedules.from_diffusers), so it cannot be saved for reloading")
        config = {"_class_name": type(self).__name__, "sampling": asdict(self.sampling()),
                  "t_list": self.t_list.tolist(), "prediction_type": self.denoiser.prediction_type,
                  "scheduler_config": schedule.config, "experts": list(experts)}
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write each expert's backbone as a diffusers model folder (``expert_0``, ...) and the config; a
        LoRA student shares its base with the teacher, so save a fused copy (``fewstep.run.export``) instead."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for p, d in enumerate(self.experts):
            if isinstance(d.adapter, str):
                raise ValueError("a LoRA student shares its base with the teacher: save the exported (fused) run "
                                 "folder instead, which FewStepGenerator.from_pretrained also reads")
            d.backbone.model.save_pretrained(folder / f"expert_{p}")
            names.append(f"expert_{p}")
        self.save_config(folder, names)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | None = None) -> "FewStepGenerator":
        """Reload a student from a folder with ``generator_config.json``: one written by ``save_pretrained``,
        or an exported fewstep run folder (its experts are the pipeline's ``unet`` / ``transformer`` folders).
        Needs no preset and no teacher."""
        import diffusers

        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        spec = Sampling(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["sampling"].items()})
        schedule = from_diffusers(config["scheduler_config"])
        experts = []
        for sub in config["experts"]:
            name = json.loads((folder / sub / "config.json").read_text())["_class_name"]
            if name == "FewStepExperts":        # a phased student exported behind one expert switch
                models = _load_experts(folder / sub, torch_dtype).experts
            else:
                models = [getattr(diffusers, name).from_pretrained(folder / sub, torch_dtype=torch_dtype)]
            experts += [Denoiser(adapter_for(m.eval(), config["prediction_type"]), schedule) for m in models]
        return cls(experts, config["t_list"], spec.init_scale, phase_of_step=spec.phase_of_step or None,
                   renoise=spec.renoise, timestep_scaling=spec.timestep_scaling, subset=spec.subset)


def _load_experts(folder: Path, torch_dtype):
    """The ``FewStepExperts`` component of an exported folder, from the file copied beside its weights."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("experts_fewstep", folder / "experts_fewstep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FewStepExperts.from_pretrained(folder, torch_dtype=torch_dtype)
