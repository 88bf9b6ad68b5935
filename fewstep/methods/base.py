"""Turns, the Method interface and the method registry.

A method owns its networks and defines one loss per turn. It never builds optimizers, never touches
accelerate and never branches on backbone family. Each method class names itself (``name = "dmd2"``), which
registers it, and builds itself from its config and the ``Parts`` the wiring layer hands it
(``Method.build``): one way to build every method, with no method importing the wiring layer.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

from fewstep.core.conditioning import Batch, Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.errors import ConfigError

#: method name -> class; filled by ``Method.__init_subclass__`` when a method module is imported
REGISTRY: dict[str, type["Method"]] = {}


class Parts(Protocol):
    """What a method's ``build`` is handed: networks initialised from the loaded teacher in the run's mode
    (``full``: trainable copies; ``lora``: adapters on the one frozen base). ``fewstep.run.build`` implements it."""

    teacher: Denoiser               # the frozen teacher (in lora mode the base with adapters disabled)
    timesteps: tuple[int, ...]      # the student's t-list in the teacher's units (model.student_timesteps)
    mode: str                       # "full" | "lora"
    total_steps: int                # train.max_steps: methods with stages split it
    run_dir: str                    # train.output_dir: files a method keeps in the run folder (KD's pairs)

    def student(self, init_scale: float = 1.0) -> FewStepGenerator:
        """A new student on the t-list; ``init_scale`` multiplies its unit input noise."""

    def critic(self) -> Denoiser:
        """A new fake-score network."""

    def head(self, critic: Denoiser) -> nn.Module | None:
        """A discriminator head on ``critic``'s tapped features, or None when ``model.gan_head`` is off."""

    def encode(self, prompts: list[str]) -> Cond:
        """The conditions of ``prompts`` (one sample each, in order) exactly as the run's batch source encodes its
        own prompts (same encoder, embedding cache and device), for a method that conditions on prompts of its
        own (SFD's forget and override prompts); a ``ConfigError`` where the source has no prompts."""

    def adapter(self, name: str) -> Denoiser:
        """A new LoRA adapter ``name`` (rank ``model.lora_rank``, starting as the teacher) on the teacher's own
        frozen backbone, in either mode: only the adapter's weights are new, and the teacher runs with every
        adapter off. In full mode make the student and critic first: they are copies of the teacher's model."""

    def prompts(self) -> list[str]:
        """The run's training prompts in order (``data.prompts``, or the images' captions), for a method that
        partitions them (MSD's prompt clusters); a ``ConfigError`` where the source has no prompts."""


@dataclass(frozen=True)
class Turn:
    """One optimizer update inside a training step: runs on steps where ``step % every == 0``
    (the two time-scale update rule of DMD2 is ``Turn("critic"), Turn("student", every=5)``). A method in stages
    bounds its turns to steps ``start <= step < stop`` (``stop`` None: to the end), ``every`` counted from ``start``
    (DisBack's recording turn stops where its critic and student turns start)."""

    name: str
    every: int = 1
    start: int = 0
    stop: int | None = None

    def runs(self, step: int) -> bool:
        """Whether the turn runs at ``step``."""
        inside = self.start <= step and (self.stop is None or step < self.stop)
        return inside and (step - self.start) % self.every == 0


class Method(nn.Module):
    """Base class: ``turns``, ``trainable()``, ``forward(turn, batch, step) -> (loss, logs)``."""

    turns: tuple[Turn, ...] = ()
    #: the registry key and the name of the entry script ``train/<name>.py`` and its presets
    name: ClassVar[str] = ""
    #: the method's config dataclass (the ``method`` section of a run config)
    Config: ClassVar[type] = object

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name:
            REGISTRY[cls.name] = cls

    @classmethod
    def build(cls, cfg, parts: Parts) -> "Method":
        """The method for config ``cfg`` (its ``Config``) on networks made by ``parts``."""
        raise NotImplementedError

    @classmethod
    def validate(cls, cfg, model, data) -> None:
        """Checks of ``cfg`` against the run's model and data sections (config objects, not built networks)
        that must fail before the teacher loads: raise ``ConfigError`` naming the field and the fix."""

    @property
    def _no_split_modules(self) -> list[str]:
        """The block classes FSDP wraps one by one: those the backbones declare themselves (diffusers'
        ``_no_split_modules``), which accelerate's TRANSFORMER_BASED_WRAP reads from the prepared module.
        So one FSDP config serves every backbone family and the method stays family-agnostic."""
        names = []
        for m in self.modules():
            if m is not self:
                for n in getattr(type(m), "_no_split_modules", None) or []:
                    if isinstance(n, str) and n not in names:
                        names.append(n)
        return names

    def trainable(self) -> dict[str, list[nn.Parameter]]:
        """Turn name -> the parameters its optimizer updates."""
        raise NotImplementedError

    def forward(self, turn: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Bookkeeping after the turns of a step (target networks, running statistics)."""

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Modules whose state a checkpoint must hold (the frozen teacher is not among them)."""
        raise NotImplementedError

    @staticmethod
    def draw(step: int, salt: int, high: int) -> int:
        """A step-determined integer in [0, high): the same on every rank and after a resume
        (backward-simulation step, few-step mixture index)."""
        g = torch.Generator().manual_seed(1_000_003 * step + salt)
        return int(torch.randint(high, (1,), generator=g))


def method_class(name: str) -> type[Method]:
    """The registered method ``name``; its module ``fewstep.methods.<name>`` is imported on first use."""
    if name not in REGISTRY:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise
    if name not in REGISTRY:
        raise ConfigError(f"method {name!r} is not known; available: {', '.join(available())}")
    return REGISTRY[name]


def available() -> list[str]:
    """Names of every method module in this package (each registers one method of that name)."""
    here = Path(__file__).parent
    return sorted(p.stem for p in here.glob("*.py") if p.stem not in ("__init__", "base"))


def require(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok``: the one-line form of every ``validate`` check."""
    if not ok:
        raise ConfigError(message)


def has_real_images(data) -> bool:
    """Whether the data section gives real samples (``Batch.x0_real``): the bundled digits, or an image folder."""
    return data.source == "digits" or bool(data.images)


def check_critic_config(cfg, model, data, head_user: str = "the discriminator") -> None:
    """The checks every method with a DMD-style critic shares: its time ranges, its GAN weights, a head for a
    GAN weight and real images for a head (``head_user`` names who reads the head in the messages)."""
    for lo, hi in (("t_min", "t_max"), ("critic_t_min", "critic_t_max")):
        a, b = getattr(cfg, lo), getattr(cfg, hi)
        require(0 <= a <= b <= 1, f"method.{lo} {a} / method.{hi} {b}: need 0 <= {lo} <= {hi} <= 1")
    require(cfg.gan_weight_student >= 0 and cfg.gan_weight_critic >= 0,
            "method.gan_weight_student and method.gan_weight_critic must be >= 0")
    require(cfg.gan_weight_student == 0 or model.gan_head,
            f"method.gan_weight_student {cfg.gan_weight_student} needs a discriminator head ({head_user}): set "
            "model.gan_head true, or method.gan_weight_student 0")
    require(not model.gan_head or has_real_images(data),
            f"model.gan_head true: {head_user} compares with real images and data.source {data.source!r} has "
            "none; set data.images to a folder of real images, or model.gan_head false")
