"""Spherical linear interpolation between a base model and one other, mergekit's `slerp`."""

from __future__ import annotations

import math

import torch

from merging.methods import MergeMethod, Param, register

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp of two whole tensors, each flattened to one vector; nearly collinear pairs
    (|cos| > 0.9995) interpolate linearly."""
    norm0 = torch.linalg.vector_norm(v0).item()
    norm1 = torch.linalg.vector_norm(v1).item()
    norm0 = norm0 if norm0 > EPS else 1.0
    norm1 = norm1 if norm1 > EPS else 1.0
    dot = torch.dot(v0.reshape(-1), v1.reshape(-1)).item() / (norm0 * norm1)
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        c0, c1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        c0 = math.sin((1.0 - t) * theta) / math.sin(theta)
        c1 = math.sin(t * theta) / math.sin(theta)
    merged = torch.mul(v0, c0)
    return merged.add_(v1, alpha=c1)


def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, t: float) -> torch.Tensor:
    """merged = sin((1-t)θ)/sinθ · base + sin(tθ)/sinθ · x, θ the angle between base and x."""
    (other,) = tensors
    assert base is not None
    return slerp_pair(t, base, other)


register(MergeMethod(
    "slerp", slerp, params=(Param("t", low=0.0, high=1.0),),
    base="required", min_models=1, max_models=1,
))
