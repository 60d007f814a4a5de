"""Linear interpolation (Wortsman et al. 2022, model soups), mergekit's `linear`."""

from __future__ import annotations

import torch

from merging.methods import MergeMethod, Param, register


def linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    weight: list[float],
    normalize: float = 1.0,
) -> torch.Tensor:
    """merged = sum_i w_i x_i, divided by sum_i w_i when `normalize` (the default)."""
    del base  # linear treats every model alike; a base model is one more input
    check_linear(weight, normalize)
    if normalize:
        weight = [w / sum(weight) for w in weight]
    merged = torch.mul(tensors[0], weight[0])
    for w, tensor in zip(weight[1:], tensors[1:], strict=True):
        merged.add_(tensor, alpha=w)
    return merged


def check_linear(weight: list[float], normalize: float = 1.0) -> None:
    if normalize and sum(weight) == 0.0:
        raise ValueError(f"weights {weight} sum to zero, so they cannot be normalized; "
                         "give weights with a non-zero sum or set normalize: false")


def linear_into(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    out: torch.Tensor,
    weight: list[float],
    normalize: float = 1.0,
) -> bool:
    """Two models, normalised, stored in `out`'s dtype: out = lerp(x_0, x_1, w_1/(w_0+w_1)),
    one pass over memory (the kernel computes in float32 for half-precision tensors)."""
    del base
    if len(tensors) != 2 or not normalize or sum(weight) == 0.0:
        return False
    if any(t.dtype != out.dtype or t.device != out.device or t.shape != out.shape
           for t in tensors):
        return False
    torch.lerp(tensors[0], tensors[1], weight[1] / sum(weight), out=out)
    return True


register(MergeMethod(
    "linear", linear,
    params=(Param("weight", per_model=True), Param("normalize", 1.0, boolean=True)),
    elementwise=True, into=linear_into,
    validate=lambda args: check_linear(args["weight"], args["normalize"]),
))
