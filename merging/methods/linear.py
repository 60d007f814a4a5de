"""Linear interpolation, mergekit's `linear`."""

from __future__ import annotations

import torch

from merging.methods import MergeMethod, register


def linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    weight: list[float],
    normalize: float = 1.0,
) -> torch.Tensor:
    """merged = sum_i w_i * x_i, divided by sum_i w_i when `normalize` (mergekit's default)."""
    del base  # linear needs no base model
    merged = torch.zeros_like(tensors[0])
    for w, tensor in zip(weight, tensors, strict=True):
        merged.add_(tensor, alpha=w)
    if normalize:
        total = sum(weight)
        if total == 0.0:
            raise ValueError("linear merge with normalize needs weights that do not sum to zero")
        merged.div_(total)
    return merged


register(MergeMethod("linear", linear, model_params=("weight",), params={"normalize": 1.0}))
