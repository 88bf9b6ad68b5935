"""Distillation methods; each module cites its paper and equations."""
from .base import Method, Turn
from .dmd2 import DMD2
from .fdistill import FDistill
from .sid import SiD

METHODS = {"dmd2": DMD2, "sid": SiD, "fdistill": FDistill}

__all__ = ["METHODS", "DMD2", "FDistill", "SiD", "Method", "Turn"]
