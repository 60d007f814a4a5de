"""Task-vector methods: mergekit's generalized task arithmetic and its eight named variants.

Each model's task vector (model - base) is sparsified, weighted, optionally reduced to the
entries that agree with the majority sign (TIES consensus), summed, optionally normalised by
the sum of the weights that contributed, scaled by `lambda` and added to the base.
"""

from __future__ import annotations

from functools import partial

import torch

from merging.methods import MergeMethod, Param, fixed_sum, register
from merging.methods import sparsify as sp

SPARSIFIERS = {
    "magnitude": (sp.magnitude, ()),
    "random": (sp.random, ("generator", "by_probability")),
    "magnitude_outliers": (sp.magnitude_outliers, ("gamma",)),
    "della_magprune": (sp.della_magprune, ("epsilon", "generator", "by_probability")),
}


def task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    sparsifier: str | None,
    consensus: bool,
    weight: list[float],
    density: list[float],
    normalize: float,
    rescale: float,
    rescale_by_probability: float = 0.0,
    gamma: list[float] | None = None,
    epsilon: list[float] | None = None,
    generator: torch.Generator | None = None,
    **shared: float,
) -> torch.Tensor:
    """merged = base + λ · Σ_i w_i m_i s(x_i - base) / (Σ_i w_i m_i if normalize), with s a
    sparsifier and m_i the TIES sign-agreement mask (or 1)."""
    assert base is not None
    lam = shared.pop("lambda", 1.0)  # `lambda` cannot be a Python parameter name
    shared.pop("int8_mask", None)  # mergekit's memory option: no effect on the result
    deltas = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
    for i, tensor in enumerate(tensors):
        delta = tensor - base
        if sparsifier is not None:
            fn, extra = SPARSIFIERS[sparsifier]
            options = {"gamma": gamma[i] if gamma else 0.0,
                       "epsilon": epsilon[i] if epsilon else 0.0,
                       "generator": generator,
                       "by_probability": bool(rescale_by_probability)}
            delta = fn(delta, density[i], rescale=bool(rescale),
                       **{k: options[k] for k in extra})
        deltas[i] = delta
    weights = torch.tensor(weight, dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape(-1, *([1] * base.dim()))
    deltas.mul_(weights)
    if consensus:
        majority = torch.where(fixed_sum(deltas, 0) >= 0, 1.0, -1.0).to(deltas.dtype)
        agree = deltas.sign() == majority
        mixed = fixed_sum(deltas * agree, 0)
        divisor = fixed_sum(weights * agree, 0)
        divisor[divisor == 0] = 1
    else:
        mixed = fixed_sum(deltas, 0)
        divisor = fixed_sum(weights, 0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return mixed.add_(base)


def _variant(name: str, sparsifier: str | None, consensus: bool, normalize: bool,
             rescale: bool) -> MergeMethod:
    params = [
        Param("weight", per_model=True),
        Param("density", 1.0, per_model=True, low=0.0, high=1.0),
        Param("lambda", 1.0),
        Param("normalize", float(normalize), boolean=True),
        Param("rescale", float(rescale), boolean=True),
        Param("int8_mask", 0.0, boolean=True),
    ]
    if sparsifier == "magnitude_outliers":
        params.append(Param("gamma", 0.01, per_model=True, low=0.0, high=1.0))
    if sparsifier == "della_magprune":
        params.append(Param("epsilon", 0.15, per_model=True, low=0.0, high=1.0))
    if sparsifier in ("random", "della_magprune"):
        params.append(Param("rescale_by_probability", 0.0, boolean=True))
    return MergeMethod(
        name, partial(task_arithmetic, sparsifier=sparsifier, consensus=consensus),
        params=tuple(params), base="required", random=sparsifier in ("random", "della_magprune"),
        elementwise=sparsifier is None,
        validate=_check_della if sparsifier == "della_magprune" else None,
    )


def _check_della(args: dict) -> None:
    for density, epsilon in zip(args["density"], args["epsilon"], strict=True):
        sp.check_della(density, epsilon)


for _args in (
    ("task_arithmetic", None, False, False, False),
    ("ties", "magnitude", True, True, False),
    ("dare_linear", "random", False, False, True),
    ("dare_ties", "random", True, False, True),
    ("breadcrumbs", "magnitude_outliers", False, False, False),
    ("breadcrumbs_ties", "magnitude_outliers", True, False, False),
    ("della", "della_magprune", True, True, True),
    ("della_linear", "della_magprune", False, False, True),
):
    register(_variant(*_args))
