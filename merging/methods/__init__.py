"""Registry of merge methods by name: one module per method, each a pure function on tensors.

Semantics, parameter names and defaults are mergekit's, so that users' existing recipes mean
the same thing here. A method declares its parameters (per model, like `weight`, or shared,
like `lambda`), their defaults and valid ranges, and how it uses a base model. The
materializer resolves every parameter for a tensor's gene and calls
`merge(tensors, base, **values)` with float32 tensors, per-model values as lists in the
recipe's model order, and a seeded `generator` for methods that draw random masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from mergesearch.errors import MergesearchError

CHUNK = 1 << 18  # elements merged at a time by chunked kernels: fits in a core's cache


def fixed_sum(x: torch.Tensor, dim: int | None = None, keepdim: bool = False,
              scratch: bool = False) -> torch.Tensor:
    """The sum of `x` (all of it, or along `dim`), added in an order fixed by construction.
    `scratch`: `x` is the caller's temporary, which the sum may overwrite (no extra memory).

    Every reduction in a merge method goes through here. Torch's CPU reductions split the work
    by thread count, so their rounding depends on torch.set_num_threads (vLLM's CPU worker
    and the main process merged different bytes, and a trial's hash did not prove). Here the
    sum is a pairwise tree of elementwise additions (first half plus second half, repeated):
    each entry added is one IEEE addition of two fixed operands, so no thread count, vector
    width or alignment can change a bit, and the additions still run on every thread. On a
    GPU the plain reduction, whose order does not depend on CPU threads."""
    if x.device.type != "cpu" or not x.is_floating_point():  # integers add alike in any order
        return x.sum() if dim is None else x.sum(dim, keepdim=keepdim)
    if dim is None:
        x, dim = x.reshape(-1), 0
    n = x.shape[dim]
    if n <= 1:  # nothing to order
        return x.sum(dim, keepdim=keepdim)
    h = n // 2
    acc = x.narrow(dim, 0, h)
    acc = acc.add_(x.narrow(dim, h, h)) if scratch else acc + x.narrow(dim, h, h)
    while True:
        if n % 2:  # the odd entry joins the last pair
            acc.narrow(dim, h - 1, 1).add_(x.narrow(dim, n - 1, 1))
        if h == 1:
            break
        x, n, h = acc, h, h // 2
        acc = x.narrow(dim, 0, h).add_(x.narrow(dim, h, h))  # in place, in our own buffer
    acc = acc if keepdim else acc.squeeze(dim)
    if 2 * acc.nbytes <= acc.untyped_storage().nbytes():  # do not hold a big buffer alive
        acc = acc.clone(memory_format=torch.contiguous_format)
    return acc


def fixed_norm(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """The L2 norm of `x` (all of it, or along `dim`), summed by `fixed_sum`."""
    return fixed_sum(x * x, dim, keepdim, scratch=True).sqrt_()


@dataclass(frozen=True)
class Param:
    """One method parameter. `default=None` means the recipe must give it."""

    name: str
    default: float | None = None
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    boolean: bool = False

    def check(self, value: float, where: str) -> None:
        if not math.isfinite(value):
            raise MergesearchError(f"{where}: {self.name} must be a finite number, not {value}")
        if self.boolean and value not in (0.0, 1.0):
            raise MergesearchError(f"{where}: {self.name} must be true or false, not {value}")
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            raise MergesearchError(
                f"{where}: {self.name} = {value} is outside [{self.low}, {self.high}]"
            )


BasePolicy = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    base: BasePolicy = "ignored"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    # Each output entry depends only on the same entry of the inputs, so the materializer may
    # merge a tensor in cache-sized chunks instead of whole (much faster on a CPU).
    elementwise: bool = False
    # Optional single-pass kernel: writes the merge straight into `out` (its own dtype) and
    # returns True, or returns False where it does not apply.
    into: Callable[..., bool] | None = None
    # Optional check of one tensor's resolved arguments, for constraints that join several
    # parameters; raises ValueError saying what is wrong. Runs before anything is merged.
    validate: Callable[[dict], None] | None = None

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params)
        raise MergesearchError(
            f"merge method {self.name!r} has no parameter {name!r} (it takes: {known})"
        )

    def check_model_count(self, count: int) -> None:
        most = self.max_models
        if self.min_models <= count and (most is None or count <= most):
            return
        wanted = f"at least {self.min_models}" + (f" and at most {most}" if most else "")
        if most == self.min_models:
            wanted = f"exactly {most}"
        raise MergesearchError(
            f"merge method {self.name!r} merges {wanted} model(s) besides the base, not {count}"
        )

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def shared_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise MergesearchError(f"unknown merge method {name!r}; known methods: {known}") from None


# Each module registers its methods on import.
from merging.methods import (  # noqa: E402,F401
    linear,
    model_stock,
    nuslerp,
    slerp,
    task_arithmetic,
)
