"""`SearchSpace`: what Optuna searches, and how a trial's parameters become a recipe.

Linear merges of two parents search one mixing coefficient `t` per gene (the weight of the
second parent; the first gets 1 - t). With more parents each gets its own weight per gene
and the merge normalises them. Genes are the layers (`per_layer`) or one value for the whole
model (`global`), plus `embed`, `norm` and `lm_head` when `outer_genes` is on.
"""

from __future__ import annotations

import optuna

from merging.layout import ModelLayout
from merging.recipe import DEFAULT_GENE, MergeRecipe
from search.spec import StudySpec


class SearchSpace:
    def __init__(self, spec: StudySpec, layout: ModelLayout):
        self.method = spec.merge.method
        self.parents = [p.name for p in spec.parents]
        self.low, self.high = spec.merge.bounds
        self.seed = spec.seed
        genes = layout.layer_genes() if spec.merge.genes == "per_layer" else [DEFAULT_GENE]
        if spec.merge.outer_genes:
            genes += layout.outer_genes()
        elif spec.merge.genes == "per_layer":
            genes.append(DEFAULT_GENE)  # embed, norm and lm_head share one value
        self.genes = genes

    def _names(self) -> dict[str, tuple[str, str]]:
        """Optuna parameter name -> (parent whose weight it sets, gene)."""
        if len(self.parents) == 2:
            return {f"t[{gene}]": (self.parents[1], gene) for gene in self.genes}
        return {f"w[{parent}][{gene}]": (parent, gene)
                for parent in self.parents for gene in self.genes}

    def suggest(self, trial: optuna.Trial) -> MergeRecipe:
        params = {name: trial.suggest_float(name, self.low, self.high) for name in self._names()}
        return self.recipe(params)

    def recipe(self, params: dict[str, float]) -> MergeRecipe:
        weights: dict[str, dict[str, float]] = {p: {} for p in self.parents}
        for name, (parent, gene) in self._names().items():
            weights[parent][gene] = params[name]
        if len(self.parents) == 2:
            first, second = self.parents
            weights[first] = {gene: 1.0 - t for gene, t in weights[second].items()}
        return MergeRecipe(
            method=self.method,
            models=tuple(self.parents),
            model_params={p: {"weight": w} for p, w in weights.items()},
            params={"normalize": 1.0},
            seed=self.seed,
        )

    def constant_params(self, weights: dict[str, float]) -> dict[str, float]:
        """Parameters of the recipe that gives every gene the same parent weights
        (a parent alone, or the uniform average): the study's warm start."""
        if len(self.parents) == 2:
            total = sum(weights.values())
            return {name: weights[self.parents[1]] / total for name in self._names()}
        return {name: weights[parent] for name, (parent, _) in self._names().items()}

    def baselines(self) -> dict[str, dict[str, float]]:
        """Warm-start parameter sets by name: each parent alone, then the uniform average."""
        out = {
            parent: self.constant_params({p: float(p == parent) for p in self.parents})
            for parent in self.parents
        }
        out["uniform"] = self.constant_params({p: 1.0 for p in self.parents})
        return out
