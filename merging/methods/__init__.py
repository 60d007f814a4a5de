"""Registry of merge methods by name: one module per method, each a pure function on tensors.

A method declares the parameters it takes per model (like `weight`) and for the whole merge
(like `normalize`, with defaults), and whether it needs a base model. The materializer
resolves each parameter for a tensor's gene and calls `merge(tensors, base, **values)`,
with per-model parameters passed as lists in the recipe's model order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mergesearch.errors import MergesearchError


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable[..., torch.Tensor]
    model_params: tuple[str, ...] = ()
    params: dict[str, float] = field(default_factory=dict)
    needs_base: bool = False


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise MergesearchError(f"unknown merge method {name!r}; known methods: {known}") from None


from merging.methods import linear  # noqa: E402,F401  (registers itself)
