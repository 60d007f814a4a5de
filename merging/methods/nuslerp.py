"""Slerp of two models by relative weight, optionally of their task vectors over a base:
mergekit's `nuslerp`."""

from __future__ import annotations

import torch

from merging.methods import MergeMethod, Param, fixed_norm, fixed_sum, register

EPS = 1e-8


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / fixed_norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp along the last dimension; rows whose cosine is within EPS² of ±1 go linear."""
    cos = fixed_sum(_unit(v0) * _unit(v1), -1, keepdim=True, scratch=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(collinear, (1 - t) * v0 + t * v1, spherical)


def nuslerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    weight: list[float],
    nuslerp_row_wise: float = 0.0,
    nuslerp_flatten: float = 1.0,
) -> torch.Tensor:
    """merged = [base +] slerp(t = w1/(w0+w1), x0 [- base], x1 [- base]), over the whole
    tensor (`nuslerp_flatten`, default), its rows, or its columns (`nuslerp_row_wise`)."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    v0, v1 = tensors
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    shape = v0.shape
    if nuslerp_flatten:
        merged = nuslerp_vectors(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    elif nuslerp_row_wise:
        merged = nuslerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        merged = nuslerp_vectors(t, v0, v1)
    return merged if base is None else merged.add_(base)


register(MergeMethod(
    "nuslerp", nuslerp,
    params=(
        Param("weight", per_model=True),
        Param("nuslerp_row_wise", 0.0, boolean=True),
        Param("nuslerp_flatten", 1.0, boolean=True),
    ),
    base="optional", min_models=2, max_models=2,
))
