"""What a study found, as one JSON-ready dict: trial counts, baselines, the best trial or the
Pareto set and its knee, every trial's history, the best trials' per-layer weight profiles,
parameter importances, and why trials were pruned or failed.

Selection uses dev values only; test values are shown beside them for the user to judge.
`selected` is what `export --trial best` (one objective) or `--trial knee` (several) writes.
The HTML page (search/report_page.py) is drawn from this dict alone.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from merging.recipe import GeneValue, MergeRecipe, resolve_gene_value
from search.item_pruning import PRUNED_BY_ATTR
from search.selection import ranked_best, recommended, top_trials
from search.study import (
    BASELINE_ATTR,
    CONSTRAINTS_ATTR,
    FAIL_REASON_ATTR,
    ITEMS_ATTR,
    PRUNE_REASON_ATTR,
    dev_objectives,
    feasible,
    stored_spec,
    test_results,
)

log = logging.getLogger(__name__)

TOP_K = 10  # rows of the top-trials table
MAX_PROFILES = 12  # lines in the weight-profile figure
MIXING = ("weight", "t")  # the parameters whose per-layer values the profile draws


def baseline_trials(study: optuna.Study) -> dict[str, FrozenTrial]:
    """Latest complete trial of each baseline (parents, uniform), by name."""
    out = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if BASELINE_ATTR in trial.user_attrs:
            out[trial.user_attrs[BASELINE_ATTR]] = trial
    return out


def baseline_scores(study: optuna.Study, spec, tests: dict[int, dict]) -> list[dict[str, Any]]:
    """Each baseline's trial and dev and test objectives: the parents in the spec's order,
    the uniform average, then warm starts. `tests` is `test_results(study)`."""
    found = baseline_trials(study)
    order = [*(p.name for p in spec.parents), "uniform",
             *sorted(name for name in found if name.startswith("warm:"))]
    return [{"name": name, "trial": found[name].number,
             "dev": dev_objectives(found[name], spec),
             "test": tests.get(found[name].number, {}).get("objectives")}
            for name in order if name in found]


def _pruning(study: optuna.Study) -> dict[str, Any]:
    """Pruned trials, the dev item evaluations their early stop saved, and why they stopped."""
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    total = max((t.user_attrs.get(ITEMS_ATTR, 0) for t in finished), default=0)
    reasons = Counter(_prune_reason(t) for t in pruned)
    return {"pruned": len(pruned),
            "items_saved": sum(total - t.user_attrs.get(ITEMS_ATTR, total) for t in pruned),
            "reasons": dict(reasons.most_common())}


def _prune_reason(trial: FrozenTrial) -> str:
    if PRUNE_REASON_ATTR in trial.user_attrs:
        # the front member's number differs per trial; the reason is the same
        return re.sub(r"trial \d+ of", "a trial of", trial.user_attrs[PRUNE_REASON_ATTR])
    if PRUNED_BY_ATTR in trial.user_attrs:  # studies from before the reason was kept
        return "a trial of the Pareto front dominates it"
    return "not recorded"


def _failures(study: optuna.Study) -> dict[str, Any]:
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    reasons = Counter((t.user_attrs.get(FAIL_REASON_ATTR) or "not recorded (the worker "
                       "stopped: killed, or its heartbeat was lost)").splitlines()[0][:300]
                      for t in failed)
    return {"count": len(failed), "reasons": dict(reasons.most_common()),
            "trials": [{"trial": t.number, "reason": t.user_attrs.get(FAIL_REASON_ATTR)}
                       for t in failed]}


def _history(study: optuna.Study, spec) -> list[dict[str, Any]]:
    """Every trial in order: state, dev objectives when complete, and what it was."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        complete = t.state == TrialState.COMPLETE
        rows.append({"trial": t.number, "state": t.state.name.lower(),
                     "dev": dev_objectives(t, spec) if complete else None,
                     "feasible": feasible(t) if complete else None,
                     "baseline": t.user_attrs.get(BASELINE_ATTR),
                     "items": t.user_attrs.get(ITEMS_ATTR)})
    return rows


def _layer_values(value: GeneValue, layers: int) -> list[float | None]:
    """A parameter's value at each layer: the mean of its attention and MLP genes where the
    space splits layers by module (the bare layer gene then only covers the layer's norms),
    else the layer's gene."""
    out = []
    for i in range(layers):
        gene = f"layers.{i}"
        parts = ([v for k, v in value.items() if k.startswith(gene + ".")]
                 if isinstance(value, dict) else [])
        out.append(sum(parts) / len(parts) if parts else resolve_gene_value(value, gene))
    return out


def _layer_count(recipes: list[MergeRecipe]) -> int:
    found = [int(m.group(1)) for r in recipes
             for scope in [r.params, *r.model_params.values()]
             for value in scope.values() if isinstance(value, dict)
             for key in value if (m := re.match(r"layers\.(\d+)", key))]
    return max(found) + 1 if found else 0


def _mixing_lines(recipe: MergeRecipe, layers: int) -> dict[str, list[float | None]]:
    """The recipe's mixing parameters per layer: `MODEL weight` per model, or slerp's `t`."""
    lines = {f"{model} {name}": _layer_values(params[name], layers)
             for model, params in recipe.model_params.items() for name in MIXING
             if name in params}
    lines.update({name: _layer_values(recipe.params[name], layers) for name in MIXING
                  if name in recipe.params})
    return lines


def _sum_to_one(first: list[float | None] | None, second: list[float | None] | None) -> bool:
    return first is not None and second is not None and all(
        a is not None and b is not None and abs(a + b - 1) < 1e-9
        for a, b in zip(first, second, strict=True))


def weight_profiles(trials: list[FrozenTrial]) -> dict[str, Any]:
    """Per-layer mixing weights of `trials`: one series per trial and model. Of two models
    whose weights sum to 1 at every layer in every trial, only the second is drawn (the
    first is 1 minus it)."""
    recipes = {t.number: MergeRecipe.from_dict(t.user_attrs["recipe"]) for t in trials
               if "recipe" in t.user_attrs}
    layers = _layer_count(list(recipes.values()))
    lines = {number: _mixing_lines(recipe, layers) for number, recipe in recipes.items()}
    names = list(dict.fromkeys(name for drawn in lines.values() for name in drawn))
    redundant = (names[0] if len(names) == 2 and all(
        _sum_to_one(drawn.get(names[0]), drawn.get(names[1])) for drawn in lines.values())
        else None)
    series = [{"trial": number, "method": recipes[number].method, "line": name,
               "values": values}
              for number, drawn in lines.items() for name, values in drawn.items()
              if name != redundant]
    return {"layers": layers, "series": series}


def importances(study: optuna.Study, spec) -> dict[str, Any]:
    """fANOVA importance of each parameter for each objective (dev values of complete
    trials), and, by objective, why it could not be computed."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = [o.name for o in spec.objectives]
    out: dict[str, Any] = {"objectives": {}, "not_computed": {}}
    if len(complete) < 3:
        reason = f"{len(complete)} complete trials; importances need at least 3"
        out["not_computed"] = dict.fromkeys(names, reason)
        return out
    values = {t.number: dev_objectives(t, spec) for t in complete}
    for name in names:
        if len({v[name] for v in values.values()}) == 1:
            out["not_computed"][name] = "every complete trial has the same dev value"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ranked = optuna.importance.get_param_importances(
                    study, target=lambda t, n=name: values[t.number][n],
                    evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError) as e:  # e.g. no parameter is shared by all trials
            out["not_computed"][name] = str(e)
            continue
        out["objectives"][name] = dict(ranked)
    return out


def build_report(study: optuna.Study) -> dict[str, Any]:
    spec = stored_spec(study)
    names = [o.name for o in spec.objectives]
    states = [t.state for t in study.get_trials(deepcopy=False)]
    tests = test_results(study)

    def entry(trial: FrozenTrial) -> dict[str, Any]:
        test = tests.get(trial.number)
        return {
            "trial": trial.number,
            "dev": dev_objectives(trial, spec),
            "test": test["objectives"] if test else None,
            "recipe": trial.user_attrs.get("recipe"),
            "weights_sha256": trial.user_attrs.get("weights_sha256"),
            "baseline": trial.user_attrs.get(BASELINE_ATTR),
            **({"constraints": trial.user_attrs.get(CONSTRAINTS_ATTR)} if spec.constraints
               else {}),
        }

    parents = [p.name for p in spec.parents]
    best = ranked_best(study)
    selected = recommended(study, best)
    profiled = ([selected] if selected else []) + [t for t in best
                                                   if t.number != selected.number]
    return {
        "study": study.study_name,
        "objectives": names,
        "parents": parents,
        "directions": [o.direction for o in spec.objectives],
        "combine": spec.combine,
        "pareto": len(study.directions) > 1,  # a front and its knee, not one best
        "trials": {
            "complete": states.count(TrialState.COMPLETE),
            "pruned": states.count(TrialState.PRUNED),
            "fail": states.count(TrialState.FAIL),
            "running": states.count(TrialState.RUNNING),
            "waiting": states.count(TrialState.WAITING),
        },
        "baselines": baseline_scores(study, spec, tests),
        "pruning": _pruning(study),
        "failures": _failures(study),
        "best": [entry(t) for t in best],
        "selected": selected.number if selected else None,
        "top": [entry(t) for t in top_trials(study, TOP_K)],
        "history": _history(study, spec),
        "profiles": weight_profiles(profiled[:MAX_PROFILES]),
        "importances": importances(study, spec),
    }
