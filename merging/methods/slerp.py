"""Spherical linear interpolation between a base model and one other, mergekit's `slerp`."""

from __future__ import annotations

import math

import torch

from merging.methods import CHUNK, MergeMethod, Param, fixed_sum, register

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


def slerp_statistics(v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float, float]:
    """|v0|², |v1|² and v0·v1 of two flat tensors, converted to float32 a cache-sized chunk
    at a time. The products are added position by position over the chunks, then each row of
    running sums by `fixed_sum`: every addition has fixed operands, whatever the threads."""
    width = min(CHUNK, v0.numel())
    stats = torch.zeros(3, width, dtype=torch.float32, device=v0.device)
    products = torch.empty_like(stats)
    for start in range(0, v0.numel(), CHUNK):
        a, b = v0[start : start + CHUNK].float(), v1[start : start + CHUNK].float()
        n = a.numel()
        for row, (x, y) in enumerate(((a, a), (b, b), (a, b))):
            torch.mul(x, y, out=products[row, :n])
        stats[:, :n] += products[:, :n]
    sq0, sq1, dot = fixed_sum(stats.double(), -1).tolist()  # one device sync per tensor
    return sq0, sq1, dot


def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, t: float) -> torch.Tensor:
    """merged = sin((1-t)θ)/sinθ · base + sin(tθ)/sinθ · x, θ the angle between base and x."""
    (other,) = tensors
    assert base is not None
    sq0, sq1, dot = slerp_statistics(base.reshape(-1), other.reshape(-1))
    c0, c1 = slerp_coefficients(t, math.sqrt(sq0), math.sqrt(sq1), dot)
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
    sq0, sq1, dot = slerp_statistics(v0, v1)
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
