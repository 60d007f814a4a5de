"""Spherical linear interpolation between a base model and one other, mergekit's `slerp`."""

from __future__ import annotations

import math

import torch

from merging.methods import CHUNK, MergeMethod, Param, register

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_coefficients(t: float, norm0: float, norm1: float, dot: float) -> tuple[float, float]:
    """(c0, c1) with slerp = c0·v0 + c1·v1, from the norms of v0, v1 and their dot product;
    nearly collinear pairs (|cos| > 0.9995) interpolate linearly."""
    norm0 = norm0 if norm0 > EPS else 1.0
    norm1 = norm1 if norm1 > EPS else 1.0
    cos = min(1.0, max(-1.0, dot / (norm0 * norm1)))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, t: float) -> torch.Tensor:
    """merged = sin((1-t)θ)/sinθ · base + sin(tθ)/sinθ · x, θ the angle between base and x."""
    (other,) = tensors
    assert base is not None
    v0, v1 = base.reshape(-1), other.reshape(-1)
    c0, c1 = slerp_coefficients(t, v0.norm().item(), v1.norm().item(), v0.dot(v1).item())
    return torch.mul(base, c0).add_(other, alpha=c1)


def slerp_into(tensors: list[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor,
               t: float) -> bool:
    """The same, in two passes over the stored tensors (statistics, then the combination),
    converting to float32 a cache-sized chunk at a time."""
    (other,) = tensors
    if not (base.shape == other.shape == out.shape
            and base.is_contiguous() and other.is_contiguous() and out.is_contiguous()):
        return False
    v0, v1, flat = base.view(-1), other.view(-1), out.view(-1)
    stats = torch.zeros(3, dtype=torch.float64, device=out.device)  # |v0|², |v1|², v0·v1
    for start in range(0, flat.numel(), CHUNK):
        a, b = v0[start : start + CHUNK].float(), v1[start : start + CHUNK].float()
        stats += torch.stack([a.dot(a), b.dot(b), a.dot(b)])
    sq0, sq1, dot = stats.tolist()  # one device sync per tensor
    c0, c1 = slerp_coefficients(t, math.sqrt(sq0), math.sqrt(sq1), dot)
    for start in range(0, flat.numel(), CHUNK):
        # out of place: .float() of a float32 parent is the parent itself
        a, b = v0[start : start + CHUNK].float(), v1[start : start + CHUNK].float()
        flat[start : start + CHUNK].copy_(torch.mul(a, c0).add_(b, alpha=c1))
    return True


register(MergeMethod(
    "slerp", slerp, params=(Param("t", low=0.0, high=1.0),),
    base="required", min_models=1, max_models=1, into=slerp_into,
))
