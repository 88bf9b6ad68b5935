"""Turns and the Method interface (DESIGN.md section 3).

A method owns its networks and defines one loss per turn. It never builds optimizers, never touches
accelerate and never branches on backbone family.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..conditioning import Batch


@dataclass(frozen=True)
class Turn:
    """One optimizer update inside a training step: runs on steps where ``step % every == 0``
    (the two time-scale update rule of DMD2 is ``Turn("critic"), Turn("student", every=5)``)."""

    name: str
    every: int = 1


class Method(nn.Module):
    """Base class: ``turns``, ``trainable()``, ``forward(turn, batch, step) -> (loss, logs)``."""

    turns: tuple[Turn, ...] = ()

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
