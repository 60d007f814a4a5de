"""`SearchSpace`: what Optuna searches, and how a trial's parameters become a recipe.

Any parameter of the merge method can be searched, with one value per gene:
- per-model mixing weights (`weight`) in `merge.bounds`; a normalised merge of two models
  (linear, nuslerp) searches one coefficient `t[gene]` instead, the second model's share;
- `t` of slerp, in `merge.bounds`;
- every parameter `merge.params` gives a range for (density, lambda, gamma, epsilon, ...);
  per-model ones get one value per model and gene (`density[clinical][layers.3]`).
Genes are the layers (`per_layer`), the layers' attention and MLP blocks and the rest of each
layer (`per_module`, also called `per_layer_module`), K control points across depth
interpolated to every layer (`anchors`, so 32 layers cost K values), or one value for the
whole model (`global`); with `outer_genes`, embeddings, final norm and lm_head get values of
their own. `gene_bounds` narrows or widens the mixing range of chosen genes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import optuna

from mergesearch.errors import SpecError
from merging.layout import ModelLayout
from merging.methods import Param, get_method
from merging.recipe import DEFAULT_GENE, MergeRecipe
from search.spec import ParamRange, StudySpec

log = logging.getLogger(__name__)

NORMALISED_PAIR = ("linear", "nuslerp")  # methods whose weights only matter as a ratio
NEUTRAL = {"density": 1.0, "lambda": 1.0}  # values that make a task-vector merge exact


@dataclass(frozen=True)
class Dimension:
    """One Optuna parameter: which method parameter, for which model and gene, in what range."""

    param: str
    model: str | None
    gene: str
    low: float
    high: float
    label: str | None = None  # `t` for the share of the second model of a normalised pair
    method: str = ""  # its method's name, where the study chooses between several

    @property
    def name(self) -> str:
        model = f"[{self.model}]" if self.model else ""
        method = f"{self.method}." if self.method else ""
        return f"{method}{self.label or self.param}{model}[{self.gene}]"


ANCHOR = "anchor."  # gene prefix of the control points of `anchors` genes


def genes(layout: ModelLayout, granularity: str, outer: bool, anchors: int = 4) -> list[str]:
    if granularity == "global":
        inner = [DEFAULT_GENE]
    elif granularity in ("per_module", "per_layer_module"):
        inner = [f"{g}{kind}" for g in layout.layer_genes() for kind in (".attn", ".mlp", "")]
    elif granularity == "anchors":
        inner = [f"{ANCHOR}{k}" for k in range(anchors)]
    else:
        inner = layout.layer_genes()
    if outer:
        return inner + layout.outer_genes()
    return inner if granularity == "global" else inner + [DEFAULT_GENE]


def expand_anchors(values: dict[str, float], num_layers: int) -> dict[str, float]:
    """Replace `anchor.k` genes by one value per layer: anchor k of K sits at depth
    k/(K-1) and layer i of L at i/(L-1), interpolated linearly between anchors (mergekit's
    gradient rule, so a merge searched this way exports as a gradient list)."""
    points = sorted((int(g[len(ANCHOR):]), v) for g, v in values.items() if g.startswith(ANCHOR))
    if not points:
        return values
    out = {g: v for g, v in values.items() if not g.startswith(ANCHOR)}
    anchor_values = [v for _, v in points]
    for i in range(num_layers):
        at = (i / (num_layers - 1) if num_layers > 1 else 0.0) * (len(anchor_values) - 1)
        low = min(int(at), len(anchor_values) - 2)
        frac = at - low
        out[f"layers.{i}"] = (1 - frac) * anchor_values[low] + frac * anchor_values[low + 1]
    return out


def _gene_bounds(gene: str, bounds: tuple[float, float],
                 overrides: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """The most specific override of `gene` (`layers.3.attn`, then `layers.3`), or bounds."""
    key = gene
    while True:
        if key in overrides:
            return overrides[key]
        if "." not in key:
            return bounds
        key = key.rsplit(".", 1)[0]


def _check_gene_keys(keys: dict[str, Any], layout: ModelLayout, anchors: int) -> None:
    known = set(layout.genes_by_tensor.values()) | set(layout.layer_genes()) | {
        f"{ANCHOR}{k}" for k in range(anchors)}
    for key in keys:
        if key not in known:
            raise SpecError(f"merge.gene_bounds.{key}: not a gene of these parents (genes: "
                            "embed, norm, lm_head, layers.N, layers.N.attn, layers.N.mlp, "
                            f"anchor.K; this model has {layout.num_layers} layers)")


METHOD_PARAM = "method"  # the categorical parameter of a study over several methods


class SearchSpace:
    """The study's space: one method's, or a categorical `method` choosing between several,
    each with its own (conditional) parameters, named `METHOD.PARAM[...]`."""

    def __init__(self, spec: StudySpec, layout: ModelLayout):
        names = spec.merge.methods
        self.layout = layout
        self.several = len(names) > 1
        self.methods = {name: MethodSpace(spec, layout, name, prefixed=self.several)
                        for name in names}

    @property
    def dimensions(self) -> list[Dimension]:
        return [d for m in self.methods.values() for d in m.dimensions]

    def suggest(self, trial: optuna.Trial) -> MergeRecipe:
        name = (trial.suggest_categorical(METHOD_PARAM, list(self.methods)) if self.several
                else next(iter(self.methods)))
        return self.methods[name].suggest(trial)

    def recipe(self, values: dict[str, Any], number: int = 0) -> MergeRecipe:
        name = values[METHOD_PARAM] if self.several else next(iter(self.methods))
        return self.methods[name].recipe(values, number)

    def point(self, method: str, values: dict[str, float]) -> dict[str, Any]:
        """Trial parameters for `values` of one method's dimensions."""
        return {METHOD_PARAM: method, **values} if self.several else values

    def baselines(self) -> dict[str, dict[str, Any]]:
        """Each baseline once, in the first listed method that can express it."""
        out: dict[str, dict[str, Any]] = {}
        for name, method_space in self.methods.items():
            for baseline, values in method_space.baselines().items():
                out.setdefault(baseline, self.point(name, values))
        return out


class MethodSpace:
    """The dimensions of one merge method, and how their values become its recipe."""

    def __init__(self, spec: StudySpec, layout: ModelLayout, method: str, prefixed: bool):
        merge = spec.merge
        self.method = get_method(method)
        self.base = merge.base_for(method)
        self.models = [p.name for p in spec.parents if p.name != merge.base]
        self.vocab_source = spec.source_parent.name
        self.seed = spec.seed
        self.pair_t = self.method.name in NORMALISED_PAIR and len(self.models) == 2
        self.num_layers = layout.num_layers
        self.layout = layout
        self.anchors = merge.anchors
        default_genes = genes(layout, merge.genes, merge.outer_genes, merge.anchors)
        _check_gene_keys(merge.gene_bounds, layout, merge.anchors)
        self.fixed: dict[str, float] = {}
        self.dimensions: list[Dimension] = []
        settings = merge.params_for(method)
        for param in self.method.params:
            setting = settings.get(param.name)
            mixing = param.name in ("weight", "t")
            if mixing:
                setting = ParamRange(low=merge.bounds[0], high=merge.bounds[1])
            if setting is None:
                continue
            if not isinstance(setting, ParamRange):
                self.fixed[param.name] = setting
                continue
            gene_list = (genes(layout, setting.genes, merge.outer_genes, merge.anchors)
                         if setting.genes else default_genes)
            label = "t" if param.name == "weight" and self.pair_t else None
            for model in self._models_of(param):
                for gene in gene_list:
                    low, high = (_gene_bounds(gene, merge.bounds, merge.gene_bounds) if mixing
                                 else (setting.low, setting.high))
                    self.dimensions.append(Dimension(param.name, model, gene, low, high, label,
                                                     method if prefixed else ""))

    def _models_of(self, param: Param) -> list[str | None]:
        if not param.per_model:
            return [None]
        if param.name == "weight" and self.pair_t:
            return [None]  # one share t for the second model; the first gets 1 - t
        return list(self.models)

    def suggest(self, trial: optuna.Trial) -> MergeRecipe:
        values = {d.name: trial.suggest_float(d.name, d.low, d.high) for d in self.dimensions}
        return self.recipe(values, trial.number)

    def recipe(self, values: dict[str, float], number: int = 0) -> MergeRecipe:
        params: dict[str, dict[str, float] | float] = dict(self.fixed)
        model_params: dict[str, dict[str, dict[str, float] | float]] = {m: {} for m in self.models}
        for param in self.method.model_params:
            if param.name in self.fixed:
                del params[param.name]
                for model in self.models:
                    model_params[model][param.name] = self.fixed[param.name]
        for d in self.dimensions:
            value = values[d.name]
            if d.param == "weight" and self.pair_t:
                first, second = self.models
                model_params[first].setdefault("weight", {})[d.gene] = 1.0 - value
                model_params[second].setdefault("weight", {})[d.gene] = value
            elif d.model is not None:
                model_params[d.model].setdefault(d.param, {})[d.gene] = value
            else:
                params.setdefault(d.param, {})[d.gene] = value
        params = {k: self._expanded(v) for k, v in params.items()}
        model_params = {m: {k: self._expanded(v) for k, v in p.items()}
                        for m, p in model_params.items()}
        return MergeRecipe(
            method=self.method.name, models=tuple(self.models), base=self.base,
            model_params={m: p for m, p in model_params.items() if p}, params=params,
            seed=self.seed * 1_000_003 + number, vocab_source=self.vocab_source,
        )

    def _expanded(self, value: float | dict[str, float]) -> float | dict[str, float]:
        return expand_anchors(value, self.num_layers) if isinstance(value, dict) else value

    def _constant(self, weights: dict[str, float]) -> dict[str, float] | None:
        """Optuna values giving every gene the same model weights (t for slerp: the share of
        the non-base model) and neutral other parameters; None if outside the space. With
        every weight 0 a task-vector merge is the base whatever its other parameters."""
        only_base = self.base is not None and not any(weights.values())
        values = {}
        for d in self.dimensions:
            if d.param == "weight" and self.pair_t:
                value = weights[self.models[1]] / sum(weights.values())
            elif d.param == "weight":
                value = weights[d.model]
            elif d.param == "t":
                value = weights[self.models[0]]
            elif d.param in NEUTRAL and not only_base:
                value = NEUTRAL[d.param]
            else:
                value = d.low
            if not d.low <= value <= d.high:
                return None
            values[d.name] = value
        if not only_base and any(self.fixed.get(p, v) != v for p, v in NEUTRAL.items()):
            return None
        return values

    def baselines(self) -> dict[str, dict[str, float]]:
        """Warm-start parameter sets by name, those the space can express exactly: each parent
        alone (the base too), then the uniform average of the merged models."""
        n = len(self.models)
        candidates: dict[str, dict[str, float]] = {}
        if self.base is not None:
            candidates[self.base] = dict.fromkeys(self.models, 0.0)
        for model in self.models:
            candidates[model] = {m: float(m == model) for m in self.models}
        candidates["uniform"] = dict.fromkeys(self.models, 1.0 / n)
        if self.method.name == "slerp":  # t: 0 is the base, 1 the other model
            candidates = {self.base: {self.models[0]: 0.0}, self.models[0]: {self.models[0]: 1.0},
                          "uniform": {self.models[0]: 0.5}}
        elif self.method.name in NORMALISED_PAIR:
            candidates.pop(self.base, None)  # a normalised merge cannot give the base alone
        out = {}
        for name, weights in candidates.items():
            values = self._constant(weights)
            if values is None or (self.method.name == "model_stock"):
                log.info("baseline %s is outside the search space; not enqueued", name)
                continue
            out[name] = values
        return out
