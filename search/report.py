"""What a study found: trial counts, baselines, the best trial or the Pareto set.

Selection uses dev values only; test values are shown beside them for the user to judge.
For several objectives, `best` is the Pareto set and `selected` is its member with the best
mean of the (direction-signed) dev objectives: the merge `export best` writes.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from mergesearch.errors import StorageError
from search.study import (
    BASELINE_ATTR,
    CONSTRAINTS_ATTR,
    FAIL_REASON_ATTR,
    ITEMS_ATTR,
    dev_objectives,
    feasible,
    stored_spec,
    test_results,
)


def _signs(study: optuna.Study) -> list[float]:
    return [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in study.directions]


def _by_signed_mean(study: optuna.Study, trials) -> list[FrozenTrial]:
    """Trials by the mean of their direction-signed study values, best first, then number."""
    signs = _signs(study)

    def key(trial: FrozenTrial) -> tuple[float, int]:
        signed = sum(s * v for s, v in zip(signs, trial.values, strict=True))
        return -signed / len(signs), trial.number

    return sorted(trials, key=key)


def _dominates(a: FrozenTrial, b: FrozenTrial, signs: list[float]) -> bool:
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values, strict=True)]
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def ranked_best(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial (one objective) or the feasible Pareto set, best signed dev
    mean first. Trials that break a constraint are never best."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if feasible(t)]
    ranked = _by_signed_mean(study, complete)
    if len(study.directions) == 1:
        return ranked[:1]
    signs = _signs(study)
    return [t for t in ranked if not any(_dominates(o, t, signs) for o in complete)]


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """Up to k trials worth a test evaluation: the best (or Pareto set), then runners-up."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if feasible(t)]
    best = ranked_best(study)
    return (best + _by_signed_mean(study, [t for t in complete if t not in best]))[:k]


def select_trial(study: optuna.Study, which: str | int) -> FrozenTrial:
    """A trial by number, or `best`: the selected merge of the report."""
    trials = study.get_trials(deepcopy=False)
    if which == "best":
        best = ranked_best(study)
        if not best:
            raise StorageError(f"study {study.study_name!r} has no complete trial yet")
        return best[0]
    number = int(which)
    if not 0 <= number < len(trials):
        raise StorageError(f"study {study.study_name!r} has no trial {number} "
                           f"(trials 0 to {len(trials) - 1})")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        raise StorageError(f"trial {number} of study {study.study_name!r} is "
                           f"{trial.state.name.lower()}, not complete; choose a complete trial")
    return trial


def baseline_trials(study: optuna.Study) -> dict[str, FrozenTrial]:
    """Latest complete trial of each baseline (parents, uniform), by name."""
    out = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if BASELINE_ATTR in trial.user_attrs:
            out[trial.user_attrs[BASELINE_ATTR]] = trial
    return out


def _pruning_savings(study: optuna.Study) -> dict[str, int]:
    """Pruned trials and the dev item evaluations their early stop saved."""
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    total = max((t.user_attrs.get(ITEMS_ATTR, 0) for t in finished), default=0)
    return {"pruned": len(pruned),
            "items_saved": sum(total - t.user_attrs.get(ITEMS_ATTR, total) for t in pruned)}


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
            **({"constraints": trial.user_attrs.get(CONSTRAINTS_ATTR)} if spec.constraints
               else {}),
        }

    baselines = baseline_trials(study)
    parents = [p.name for p in spec.parents]
    best = ranked_best(study)
    return {
        "study": study.study_name,
        "objectives": names,
        "directions": spec.directions,
        "trials": {
            "complete": states.count(TrialState.COMPLETE),
            "pruned": states.count(TrialState.PRUNED),
            "fail": states.count(TrialState.FAIL),
            "running": states.count(TrialState.RUNNING),
            "waiting": states.count(TrialState.WAITING),
        },
        "baselines": [
            {"name": name, **{k: v for k, v in entry(baselines[name]).items()
                              if k in ("trial", "dev", "test")}}
            for name in [*parents, "uniform", *sorted(b for b in baselines
                                                       if b.startswith("warm:"))]
            if name in baselines
        ],
        "pruning": _pruning_savings(study),
        "failures": [{"trial": t.number, "reason": t.user_attrs.get(FAIL_REASON_ATTR)}
                     for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))],
        "best": [entry(t) for t in best],
        "selected": best[0].number if best else None,
    }
