"""`Materializer`: turns a recipe into merged weights, tensor by tensor.

It never builds a second model: `tensors()` yields merged tensors one at a time (for export
and for engines with their own loaders) and `write_into()` copies each into the live
parameters of a model in place, so extra memory stays within a few tensors. Arithmetic is
float32 per tensor; results are stored in the target dtype. Both paths hash exactly the bytes
they produce, in tensor-name order, so a recipe scored in an engine and later exported can be
proven to be the same weights.

Every parameter of every tensor is resolved and checked before the first tensor is merged,
so a bad recipe fails before anything is written. Random methods (DARE, DELLA) draw their
masks from a generator seeded by the recipe's seed and the tensor's name: the same recipe
gives the same bytes on any run and in any tensor order. Every method's reductions add in an
order fixed by construction (`merging.methods.fixed_sum`), so on a CPU the bytes do not
depend on torch's thread count either.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mergesearch.errors import MergesearchError
from merging.methods import CHUNK, MergeMethod, get_method
from merging.parents import Parents
from merging.recipe import MergeRecipe


def _piece_digests(tensor: torch.Tensor, piece: int, written=None) -> bytes:
    """sha256 of each `piece`-byte piece of the tensor's bytes, concatenated. `written`: a
    CUDA event recorded after the tensor was written, waited for before it is read."""
    if written is not None:
        written.synchronize()
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return b"".join(hashlib.sha256(data[i : i + piece]).digest()
                    for i in range(0, max(len(data), 1), piece))


class WeightsHash:
    """sha256 over (name, dtype, shape, sha256 of each 64 MiB piece of the bytes) of each
    tensor, fed in a fixed order.

    Tensors are hashed on a thread pool (hashlib and torch's copies release the GIL), so the
    hash of a trial's weights is computed while the engine scores them: `update` returns at
    once and `hexdigest` waits. The tensors must not change until `hexdigest` returns."""

    FORMAT = "v2"  # recorded with each hash: v1 hashed the bytes whole, with no pieces
    PIECE = 64 * 2**20
    _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="hash")

    def __init__(self, max_pending: int | None = 2 * (os.cpu_count() or 1)) -> None:
        """`max_pending`: tensors held for hashing at most (None: no bound, for tensors that
        live on anyway, like a model's own parameters)."""
        self._h = hashlib.sha256()
        self._pending: deque[tuple[bytes, Future]] = deque()
        self._max_pending = max_pending

    def update(self, name: str, tensor: torch.Tensor) -> None:
        header = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode()
        # The hashing thread reads on a stream of its own, which nothing orders after the
        # writer's (vLLM's workers run on a stream that is not the default one).
        written = None
        if tensor.is_cuda:
            written = torch.cuda.Event()
            written.record(torch.cuda.current_stream(tensor.device))
        self._pending.append(
            (header, self._pool.submit(_piece_digests, tensor, self.PIECE, written)))
        while self._max_pending is not None and len(self._pending) > self._max_pending:
            self._fold()

    def _fold(self) -> None:
        header, digests = self._pending.popleft()
        self._h.update(header)
        self._h.update(digests.result())

    def hexdigest(self) -> str:
        while self._pending:
            self._fold()
        return self._h.hexdigest()


def tensor_seed(recipe_seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{recipe_seed}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class TensorPlan:
    """Everything needed to merge one tensor: its resolved method arguments."""

    name: str
    args: dict[str, float | list[float]]


class Materializer:
    def __init__(self, parents: Parents):
        self.parents = parents

    def check(self, recipe: MergeRecipe) -> MergeMethod:
        method = get_method(recipe.method)
        known = set(self.parents.folders)
        named = (*recipe.models, *([recipe.base] if recipe.base else []),
                 *([recipe.vocab_source] if recipe.vocab_source else []))
        for model in named:
            if model not in known:
                raise MergesearchError(
                    f"recipe names model {model!r}, which is not a parent "
                    f"(parents: {', '.join(sorted(known))})"
                )
        if method.base == "required" and recipe.base is None:
            raise MergesearchError(f"merge method {method.name!r} needs a base model")
        if method.base == "ignored" and recipe.base is not None:
            raise MergesearchError(
                f"merge method {method.name!r} takes no base model; list {recipe.base!r} "
                "among the models instead"
            )
        if recipe.base is not None and recipe.base in recipe.models:
            raise MergesearchError(
                f"base model {recipe.base!r} is also among the models merged onto it"
            )
        method.check_model_count(len(recipe.models))
        for scope, settings in [("", recipe.params)] + [
                (f" for model {m!r}", recipe.model_params.get(m, {})) for m in recipe.models]:
            for name in settings:
                param = method.param(name)
                if scope and not param.per_model:
                    raise MergesearchError(
                        f"parameter {name!r} of {method.name!r} is shared by all models; "
                        f"the recipe sets it{scope}"
                    )
        return method

    def plan(self, recipe: MergeRecipe) -> tuple[MergeMethod, list[TensorPlan]]:
        """Resolve and check every parameter of every tensor, before anything is merged."""
        method = self.check(recipe)
        plans = []
        for name in self.parents.names:
            gene = self.parents.layout.gene(name)
            args: dict[str, float | list[float]] = {}
            for param in method.params:
                models = recipe.models if param.per_model else (None,)
                values = []
                for model in models:
                    where = f"tensor {name!r}" + (f", model {model!r}" if model else "")
                    value = recipe.value(param.name, gene, name, model)
                    if value is None:
                        if param.default is None:
                            raise MergesearchError(f"{where}: the recipe gives no {param.name!r}")
                        value = param.default
                    param.check(value, where)
                    values.append(value)
                args[param.name] = values if param.per_model else values[0]
            if method.validate is not None:
                try:
                    method.validate(args)
                except ValueError as e:
                    raise MergesearchError(f"tensor {name!r}: {e}") from None
            plans.append(TensorPlan(name, args))
        return method, plans

    def merge_into(self, method: MergeMethod, recipe: MergeRecipe, plan: TensorPlan,
                   out: torch.Tensor) -> None:
        """Merge one tensor into `out` (its final dtype and shape): with the method's
        single-pass kernel where it has one that applies; elementwise methods chunk by chunk,
        converting to float32 only a cache-sized piece at a time; the rest whole, in float32."""
        # Parents held in host memory for a GPU target are merged on the GPU.
        inputs = [self.parents.tensor(m, plan.name).to(out.device, non_blocking=True)
                  for m in recipe.models]
        base = self.parents.tensor(recipe.base, plan.name) if recipe.base else None
        base = base.to(out.device, non_blocking=True) if base is not None else None
        whole = inputs + ([base] if base is not None else [])
        if method.into is not None and method.into(inputs, base, out, **plan.args):
            return
        if not (method.elementwise and out.is_contiguous()
                and all(t.shape == out.shape and t.is_contiguous() for t in whole)):
            out.copy_(self.merged_tensor(method, recipe, plan, out.device))
            return
        flat_out = out.view(-1)
        flat_in = [t.view(-1) for t in inputs]
        flat_base = base.view(-1) if base is not None else None
        for start in range(0, flat_out.numel(), CHUNK):
            end = start + CHUNK
            merged = method.merge(
                [t[start:end].float() for t in flat_in],
                flat_base[start:end].float() if flat_base is not None else None, **plan.args)
            flat_out[start:end].copy_(merged)

    def merged_tensor(self, method: MergeMethod, recipe: MergeRecipe, plan: TensorPlan,
                      device: torch.device) -> torch.Tensor:
        """One merged tensor in float32, computed on `device`."""
        name = plan.name

        used = [*recipe.models, *([recipe.base] if recipe.base else [])]
        held = {m: self.parents.tensor(m, name) for m in {*used, recipe.rows_source}}
        source = held[recipe.rows_source]
        rows = None
        if len({t.shape for t in held.values()}) > 1:  # vocabularies differ
            rows = min(t.shape[0] for t in held.values())  # merge the rows every parent has
            held = {m: t[:rows] for m, t in held.items()}
        inputs = [held[m].to(device, non_blocking=True).float() for m in recipe.models]
        base = held[recipe.base].to(device).float() if recipe.base else None
        args = dict(plan.args)
        if method.random:
            args["generator"] = torch.Generator(device).manual_seed(
                tensor_seed(recipe.seed, name))
        merged = method.merge(inputs, base, **args)
        if rows is not None and rows < source.shape[0]:  # rows only the source model has
            merged = torch.cat([merged, source[rows:].to(device).float()])
        return merged

    def tensors(
        self, recipe: MergeRecipe, dtype: torch.dtype, digest: WeightsHash | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor in `dtype`) in name order, feeding `digest` if given, merged
        on `device` (default: where the parents are held). The recipe is checked here, before
        the first tensor is asked for: an engine loading them has touched nothing yet."""
        method, plans = self.plan(recipe)
        return self._merged(method, recipe, plans, dtype, digest, device)

    def _merged(self, method: MergeMethod, recipe: MergeRecipe, plans: list[TensorPlan],
                dtype: torch.dtype, digest: WeightsHash | None,
                device: torch.device | str | None) -> Iterator[tuple[str, torch.Tensor]]:
        for plan in plans:
            rows = self.parents.tensor(recipe.rows_source, plan.name)
            merged = torch.empty(rows.shape, dtype=dtype, device=device or rows.device)
            self.merge_into(method, recipe, plan, merged)
            if digest is not None:
                digest.update(plan.name, merged)
            yield plan.name, merged

    def weights_hash(self, recipe: MergeRecipe, dtype: torch.dtype) -> str:
        digest = WeightsHash()
        for _ in self.tensors(recipe, dtype, digest):
            pass
        return digest.hexdigest()

    @torch.no_grad()
    def write_into(self, model: torch.nn.Module, recipe: MergeRecipe) -> WeightsHash:
        """Write the merged weights into `model`'s own tensors in place. Returns their hash,
        still being computed in the background: call `hexdigest()` before the next write."""
        method, plans = self.plan(recipe)
        targets = model.state_dict(keep_vars=True)
        written: dict[int, str] = {}
        for plan in plans:
            target = targets.get(plan.name)
            if target is None:
                raise MergesearchError(
                    f"the model has no tensor {plan.name!r} that the parents have; "
                    "is it the same architecture as the parents?"
                )
            rows = self.parents.tensor(recipe.rows_source, plan.name).shape
            if target.shape != rows:
                raise MergesearchError(
                    f"the model's tensor {plan.name!r} has shape {tuple(target.shape)} but the "
                    f"merge gives {tuple(rows)} (rows from {recipe.rows_source!r})"
                )
            other = written.setdefault(target.data_ptr(), plan.name)
            if other != plan.name:  # tied in the model, separate in the parents
                raise MergesearchError(
                    f"the model's tensors {other!r} and {plan.name!r} share memory, but the "
                    "parents hold them apart; is tie_word_embeddings the same in all configs?"
                )
        digest = WeightsHash(max_pending=None)  # the parameters outlive the hashing
        for plan in plans:
            target = targets[plan.name]
            self.merge_into(method, recipe, plan, target.data)
            digest.update(plan.name, target.data)
        return digest
