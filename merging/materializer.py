"""`Materializer`: turns a recipe into merged weights, tensor by tensor.

It never builds a second model: `tensors()` yields merged tensors one at a time (for export
and for engines with their own loaders) and `write_into()` copies each into the live
parameters of a model in place. Arithmetic is float32 per tensor; results are stored in the
target dtype. Both paths hash exactly the bytes they produce, in tensor-name order, so a
recipe scored in an engine and later exported can be proven to be the same weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from mergesearch.errors import MergesearchError
from merging.methods import MergeMethod, get_method
from merging.parents import Parents
from merging.recipe import MergeRecipe


class WeightsHash:
    """sha256 over (name, dtype, shape, bytes) of each tensor, fed in a fixed order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, name: str, tensor: torch.Tensor) -> None:
        cpu = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._h.update(f"{name}|{cpu.dtype}|{tuple(tensor.shape)}|".encode())
        self._h.update(cpu.view(torch.uint8).numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class Materializer:
    def __init__(self, parents: Parents):
        self.parents = parents

    def check(self, recipe: MergeRecipe) -> MergeMethod:
        method = get_method(recipe.method)
        known = set(self.parents.folders)
        for model in (*recipe.models, *([recipe.base] if recipe.base else [])):
            if model not in known:
                raise MergesearchError(
                    f"recipe names model {model!r}, which is not a parent "
                    f"(parents: {', '.join(sorted(known))})"
                )
        if method.needs_base and recipe.base is None:
            raise MergesearchError(f"merge method {method.name!r} needs a base model")
        return method

    def merged_tensor(self, method: MergeMethod, recipe: MergeRecipe, name: str) -> torch.Tensor:
        """One merged tensor in float32."""
        gene = self.parents.layout.gene(name)
        inputs = [self.parents.tensor(m, name).float() for m in recipe.models]
        base = self.parents.tensor(recipe.base, name).float() if recipe.base else None
        per_model = {
            p: [recipe.model_value(m, p, gene) for m in recipe.models] for p in method.model_params
        }
        params = {p: recipe.param_value(p, gene, d) for p, d in method.params.items()}
        return method.merge(inputs, base, **per_model, **params)

    def tensors(
        self, recipe: MergeRecipe, dtype: torch.dtype, digest: WeightsHash | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, merged tensor in `dtype`) in name order, feeding `digest` if given."""
        method = self.check(recipe)
        for name in self.parents.names:
            merged = self.merged_tensor(method, recipe, name).to(dtype)
            if digest is not None:
                digest.update(name, merged)
            yield name, merged

    def weights_hash(self, recipe: MergeRecipe, dtype: torch.dtype) -> str:
        digest = WeightsHash()
        for _ in self.tensors(recipe, dtype, digest):
            pass
        return digest.hexdigest()

    @torch.no_grad()
    def write_into(self, model: torch.nn.Module, recipe: MergeRecipe) -> str:
        """Write the merged weights into `model`'s own tensors in place; return their hash."""
        method = self.check(recipe)
        targets = model.state_dict(keep_vars=True)
        missing = [name for name in self.parents.names if name not in targets]
        if missing:
            raise MergesearchError(
                f"the model has no tensor {missing[0]!r} that the parents have; "
                "is it the same architecture as the parents?"
            )
        digest = WeightsHash()
        for name in self.parents.names:
            target = targets[name]
            target.data.copy_(self.merged_tensor(method, recipe, name))
            digest.update(name, target.data)
        return digest.hexdigest()
