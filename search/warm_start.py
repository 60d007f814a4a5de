"""Warm-start recipes the user lists (`merge.warm_start`): an export's
`mergesearch_recipe.json`, a bare recipe JSON, or a mergekit YAML config over the parents.

Each becomes the Optuna parameters of the study's space that reproduce it (read at each
dimension's gene), enqueued like the baselines. Where the space is coarser than the recipe
(a per-layer recipe in an `anchors` space, say) the point is the space's nearest reading of
it, and the log says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mergesearch.errors import SpecError
from merging import MergeRecipe, Parents
from merging.mergekit_config import read_mergekit_config
from search.space import ANCHOR, MethodSpace, SearchSpace
from search.spec import StudySpec

log = logging.getLogger(__name__)


def read_recipe(path: Path, spec: StudySpec, parents: Parents) -> MergeRecipe:
    where = f"merge.warm_start: {path}"
    if path.suffix.lower() in (".yml", ".yaml"):
        config = read_mergekit_config(path, lambda _: parents.layout)
        by_folder = {p.path.resolve(): p.name for p in spec.parents}
        names = {}
        for name, folder in config.paths.items():
            if folder.resolve() not in by_folder:
                raise SpecError(f"{where}: model {folder} is not one of the study's parents")
            names[name] = by_folder[folder.resolve()]
        r = config.recipe
        return MergeRecipe(
            r.method, tuple(names[m] for m in r.models),
            {names[m]: p for m, p in r.model_params.items()}, r.params,
            names[r.base] if r.base else None, r.seed,
            names[r.vocab_source] if r.vocab_source else None)
    try:
        data = json.loads(path.read_text())
        return MergeRecipe.from_dict(data.get("recipe", data))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SpecError(f"{where}: not a recipe JSON or mergekit YAML ({e})") from None


def _tensors_of(space: MethodSpace, gene: str) -> list[str]:
    """The tensors a dimension's gene stands for (an anchor: its layer)."""
    layout = space.layout
    if gene.startswith(ANCHOR):
        k, count = int(gene[len(ANCHOR):]), space.anchors
        gene = f"layers.{round(k * (layout.num_layers - 1) / (count - 1))}"
    by_gene = layout.genes_by_tensor.items()
    exact = [t for t, g in by_gene if g == gene]
    if exact:
        return exact
    if gene == "*":
        return [t for t, g in by_gene if g.startswith("layers.")] or list(layout.genes_by_tensor)
    return [t for t, g in by_gene if g.startswith(gene + ".")]


def space_point(study_space: SearchSpace, recipe: MergeRecipe, where: str) -> dict[str, float]:
    """The space's parameters for `recipe`, checked to lie within its bounds."""
    space = study_space.methods.get(recipe.method)
    if space is None or set(recipe.models) != set(space.models) or recipe.base != space.base:
        searched = "; ".join(f"{m.method.name} of {', '.join(m.models)} (base {m.base})"
                             for m in study_space.methods.values())
        raise SpecError(f"{where}: a {recipe.method} merge of {', '.join(recipe.models)} "
                        f"(base {recipe.base}); the study searches {searched}")
    layout = space.layout
    values = {}
    for d in space.dimensions:
        tensor = _tensors_of(space, d.gene)[0]
        gene = layout.gene(tensor)
        if d.label == "t":
            first, second = (recipe.value("weight", gene, tensor, m) for m in space.models)
            value = second / (first + second) if first is not None and second is not None \
                and first + second else None
        else:
            value = recipe.value(d.param, gene, tensor, d.model)
        if value is None:
            raise SpecError(f"{where}: the recipe gives no {d.param} for {d.name}")
        if not d.low <= value <= d.high:
            raise SpecError(f"{where}: {d.name} = {value:g} is outside the space's "
                            f"[{d.low:g}, {d.high:g}]")
        values[d.name] = value
    rebuilt = space.recipe(values)
    if any(abs((rebuilt.value(p.name, g, t, m) or 0) - (recipe.value(p.name, g, t, m) or 0))
           > 1e-9 for p in space.method.params for m in (*space.models, None)
           for t, g in layout.genes_by_tensor.items()):
        log.warning("%s: the search space cannot express the recipe exactly; warm-starting "
                    "from its nearest reading", where)
    return study_space.point(recipe.method, values)


def warm_start_points(spec: StudySpec, space: SearchSpace, parents: Parents
                      ) -> dict[str, dict[str, float]]:
    """`warm:<file stem>` -> parameters, for every file in `merge.warm_start`."""
    return {f"warm:{path.stem}": space_point(space, read_recipe(path, spec, parents),
                                             f"merge.warm_start: {path}")
            for path in spec.merge.warm_start}
