"""`MergeRecipe`: the single currency between search, merger, store and export.

A recipe names a merge method, the parent models, and the method's parameters. Every
parameter is either one number or a mapping from gene to number. Genes are hierarchical
dotted names (`layers.3.attn` falls back to `layers.3`, then to `*`), so a recipe can be as
coarse or as fine as the search space that produced it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

GeneValue = float | dict[str, float]

DEFAULT_GENE = "*"


def resolve_gene_value(value: GeneValue, gene: str) -> float:
    """The value a parameter takes for `gene`, walking up the gene hierarchy to `*`."""
    if not isinstance(value, dict):
        return float(value)
    key = gene
    while True:
        if key in value:
            return float(value[key])
        if "." not in key:
            break
        key = key.rsplit(".", 1)[0]
    if DEFAULT_GENE in value:
        return float(value[DEFAULT_GENE])
    raise KeyError(f"no value for gene {gene!r} (and no {DEFAULT_GENE!r} default)")


@dataclass(frozen=True)
class MergeRecipe:
    """What to merge and how: method, parents in order, and per-gene parameters."""

    method: str
    models: tuple[str, ...]
    model_params: dict[str, dict[str, GeneValue]] = field(default_factory=dict)
    params: dict[str, GeneValue] = field(default_factory=dict)
    base: str | None = None
    seed: int = 0

    def model_value(self, model: str, name: str, gene: str, default: float | None = None) -> float:
        value = self.model_params.get(model, {}).get(name)
        if value is None:
            if default is None:
                raise KeyError(f"recipe gives no {name!r} for model {model!r}")
            return default
        return resolve_gene_value(value, gene)

    def param_value(self, name: str, gene: str, default: float) -> float:
        value = self.params.get(name)
        return default if value is None else resolve_gene_value(value, gene)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "models": list(self.models),
            "model_params": self.model_params,
            "params": self.params,
            "base": self.base,
            "seed": self.seed,
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
        )

    @classmethod
    def from_json(cls, text: str) -> MergeRecipe:
        return cls.from_dict(json.loads(text))
