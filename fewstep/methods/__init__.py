"""Distillation methods; each module cites its paper and equations."""
from .base import Method, Turn
from .consistency import Consistency
from .dmd2 import DMD2
from .fdistill import FDistill
from .phased_dmd import PhasedDMD
from .sid import SiD

METHODS = {"dmd2": DMD2, "sid": SiD, "fdistill": FDistill, "phased_dmd": PhasedDMD, "consistency": Consistency}

__all__ = ["METHODS", "Consistency", "DMD2", "FDistill", "PhasedDMD", "SiD", "Method", "Turn"]
