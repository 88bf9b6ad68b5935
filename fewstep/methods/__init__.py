"""Distillation methods; each module cites its paper and equations."""
from .base import Method, Turn
from .dmd2 import DMD2

METHODS = {"dmd2": DMD2}

__all__ = ["METHODS", "DMD2", "Method", "Turn"]
