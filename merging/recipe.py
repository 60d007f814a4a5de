"""`MergeRecipe`: the single currency between search, merger, store and export.

A recipe names a merge method, the parent models, and the method's parameters. Every
parameter is either one number or a mapping from gene to number. Genes are hierarchical
dotted names (`layers.3.attn` falls back to `layers.3`, then to `*`), so a recipe can be as
coarse or as fine as the search space that produced it. A key may also be a full tensor
name, which overrides its gene (mergekit configs that filter on names need this).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

GeneValue = float | dict[str, float]

DEFAULT_GENE = "*"


def resolve_gene_value(value: GeneValue, gene: str, tensor: str | None = None) -> float | None:
    """The value a parameter takes for `tensor` of `gene`: the tensor's own entry if there is
    one, else the gene's, walking up the gene hierarchy to `*`; None if nothing matches."""
    if not isinstance(value, dict):
        return float(value)
    if tensor is not None and tensor in value:
        return float(value[tensor])
    key = gene
    while True:
        if key in value:
            return float(value[key])
        if "." not in key:
            break
        key = key.rsplit(".", 1)[0]
    return float(value[DEFAULT_GENE]) if DEFAULT_GENE in value else None


@dataclass(frozen=True)
class MergeRecipe:
    """What to merge and how: method, parents in order, and per-gene parameters."""

    method: str
    models: tuple[str, ...]
    model_params: dict[str, dict[str, GeneValue]] = field(default_factory=dict)
    params: dict[str, GeneValue] = field(default_factory=dict)
    base: str | None = None
    seed: int = 0
    vocab_source: str | None = None

    def value(self, name: str, gene: str, tensor: str, model: str | None = None) -> float | None:
        """Parameter `name` for one tensor: the model's own setting first (when `model` is
        given), then the recipe-wide one; None when neither covers the tensor."""
        for scope in ((self.model_params.get(model, {}),) if model else ()) + (self.params,):
            if name in scope:
                value = resolve_gene_value(scope[name], gene, tensor)
                if value is not None:
                    return value
        return None

    @property
    def rows_source(self) -> str:
        """The model whose embedding and lm_head rows the merge keeps where parents'
        vocabularies differ in size."""
        return self.vocab_source or self.base or self.models[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "models": list(self.models),
            "model_params": self.model_params,
            "params": self.params,
            "base": self.base,
            "seed": self.seed,
            "vocab_source": self.vocab_source,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeRecipe:
        return cls(
            method=data["method"],
            models=tuple(data["models"]),
            model_params={m: dict(p) for m, p in data.get("model_params", {}).items()},
            params=dict(data.get("params", {})),
            base=data.get("base"),
            seed=int(data.get("seed", 0)),
            vocab_source=data.get("vocab_source"),
        )

    @classmethod
    def from_json(cls, text: str) -> MergeRecipe:
        return cls.from_dict(json.loads(text))
