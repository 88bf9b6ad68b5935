"""Conversions between the four output types of diffusers backbones, through x0.

diffusers' vocabulary: ``sample`` (x0), ``epsilon``, ``v_prediction`` (``v = alpha eps - sigma x0``,
Salimans & Ho 2022, arXiv 2202.00512) and ``flow_prediction`` (``u = alpha' x0 + sigma' eps``, the
time derivative of ``x_t``; for rectified flow ``u = eps - x0``). x0 is the pivot:

    x0 = (sigma' x_t - sigma u) / (sigma' alpha - sigma alpha')
    x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)

Every function works for any ``NoiseSchedule`` and runs in the dtype of ``x_t`` (float32, or float64 for the
Denoiser's conversion, as the official DMD2 converts).
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor

from fewstep.core.schedules import NoiseSchedule, bcast

PredictionType = Literal["sample", "epsilon", "v_prediction", "flow_prediction"]
PREDICTION_TYPES = ("sample", "epsilon", "v_prediction", "flow_prediction")


def _check(kind: str) -> None:
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {kind!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def to_x0(out: Tensor, x_t: Tensor, t: Tensor, kind: PredictionType, s: NoiseSchedule) -> Tensor:
    """x0 implied by a backbone output ``out`` of type ``kind`` at ``(x_t, t)``."""
    _check(kind)
    if kind == "sample":
        return out
    d = x_t.dtype
    a, sg = bcast(s.alpha(t, d), x_t), bcast(s.sigma(t, d), x_t)
    if kind == "epsilon":
        return (x_t - sg * out) / a
    if kind == "v_prediction":
        return (a * x_t - sg * out) / (a * a + sg * sg)
    da, ds = bcast(s.d_alpha(t, d), x_t), bcast(s.d_sigma(t, d), x_t)
    return (ds * x_t - sg * out) / (ds * a - sg * da)


def eps_from_x0(x0: Tensor, x_t: Tensor, t: Tensor, s: NoiseSchedule) -> Tensor:
    """Noise implied by ``x0`` at ``(x_t, t)``: ``eps = (x_t - alpha x0) / sigma``."""
    d = x_t.dtype
    return (x_t - bcast(s.alpha(t, d), x_t) * x0) / bcast(s.sigma(t, d), x_t)


def from_x0(x0: Tensor, x_t: Tensor, t: Tensor, kind: PredictionType, s: NoiseSchedule) -> Tensor:
    """Output of type ``kind`` that a backbone predicting ``x0`` at ``(x_t, t)`` would give."""
    _check(kind)
    if kind == "sample":
        return x0
    eps = eps_from_x0(x0, x_t, t, s)
    if kind == "epsilon":
        return eps
    d = x_t.dtype
    if kind == "v_prediction":
        return bcast(s.alpha(t, d), x_t) * eps - bcast(s.sigma(t, d), x_t) * x0
    return bcast(s.d_alpha(t, d), x_t) * x0 + bcast(s.d_sigma(t, d), x_t) * eps


def convert(out: Tensor, x_t: Tensor, t: Tensor, s: NoiseSchedule, src: PredictionType,
            dst: PredictionType) -> Tensor:
    """Convert an output of type ``src`` to type ``dst`` through x0."""
    return out if src == dst else from_x0(to_x0(out, x_t, t, src, s), x_t, t, dst, s)
