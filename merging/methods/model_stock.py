"""Model Stock (Jang et al. 2024), mergekit's `model_stock`."""

from __future__ import annotations

import torch

from merging.methods import MergeMethod, Param, fixed_norm, fixed_sum, register


def model_stock(
    tensors: list[torch.Tensor], base: torch.Tensor | None, filter_wise: float = 0.0
) -> torch.Tensor:
    """merged = t·mean(x_i) + (1-t)·base with t = k·cosθ / (1 + (k-1)·cosθ), cosθ the mean
    pairwise cosine of the task vectors x_i - base (per row with `filter_wise`)."""
    assert base is not None
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in tensors]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in tensors]
    offsets = [x - w0 for x in ws]
    norms = [fixed_norm(o, dim=-1) for o in offsets]
    cosines = [
        (fixed_sum(a * b, -1, scratch=True) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i, a in enumerate(offsets)
        for j, b in enumerate(offsets)
        if j > i
    ]
    cos = (fixed_sum(torch.stack(cosines), 0) / len(cosines)).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base there
    t = torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, denominator))
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)


register(MergeMethod(
    "model_stock", model_stock, params=(Param("filter_wise", 0.0, boolean=True),),
    base="required", min_models=2,
))
