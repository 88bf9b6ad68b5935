"""Distillation methods, one module per paper; each registers itself under its ``name`` (see ``base``)."""
from fewstep.methods.base import REGISTRY, Method, Parts, Turn, available, method_class

__all__ = ["REGISTRY", "Method", "Parts", "Turn", "available", "method_class"]
