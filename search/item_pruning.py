"""Stopping a hopeless trial between evaluation chunks, from its per-item scores.

One objective (or `combine: weighted`): Optuna's WilcoxonPruner, fed one step per item, tests
the trial's items against the best trial's on the same items.

Several objectives (a Pareto study), which Optuna does not prune: the trial is stopped when a
member of the current Pareto front dominates it with evidence on every objective. For each
front member and each objective, a one-sided paired Wilcoxon signed-rank test of the trial's
item scores against the member's on the same items asks whether the trial is worse; only when
all objectives' tests reject at `p_threshold` is the trial dominated (an intersection-union
test, so the chance of stopping a trial that is not worse on every objective stays at most
`p_threshold` per comparison). A trial dominated by a front member cannot be on the front,
which is why stopping it keeps the front; bench/sample_efficiency.py measures both the saving
and that the front is unchanged.
"""

from __future__ import annotations

import math

import optuna
from scipy.stats import wilcoxon

from evaluators.suite import ItemResult
from search.spec import StudySpec
from search.workbench import Workbench
from storage.records import RecordStore

PRUNED_BY_ATTR = "pruned_by"
MIN_PAIRS = 6  # below this a signed-rank test cannot reach p < 0.05 at all


class WilcoxonItems:
    """One objective: each item a step for Optuna's WilcoxonPruner."""

    def __init__(self, bench: Workbench):
        self.bench = bench

    def check(self, trial: optuna.Trial, items: list[ItemResult], new: int) -> str | None:
        for step in range(len(items) - new, len(items)):
            trial.report(self.bench.item_value(items[step]), step)
        return "its items score below the best trial's" if trial.should_prune() else None


class DominatedByFront:
    """Several objectives: stop the trial once a Pareto-front member dominates it.
    `metrics` gives each probe's default metric (an objective without one uses it)."""

    def __init__(self, spec: StudySpec, metrics: dict[str, str], records: RecordStore,
                 p_threshold: float):
        self.spec, self.metrics = spec, metrics
        self.records, self.p_threshold = records, p_threshold
        self._scores: dict[int, dict[tuple[str, str], dict[str, float]]] = {}

    def check(self, trial: optuna.Trial, items: list[ItemResult], new: int) -> str | None:
        del new
        for member in _feasible_front(trial.study):
            if self._dominates(member.number, trial.study.study_name, items):
                trial.set_user_attr(PRUNED_BY_ATTR, member.number)
                return f"trial {member.number} of the Pareto front dominates it"
        return None

    def _dominates(self, number: int, study: str, items: list[ItemResult]) -> bool:
        theirs = self._member_scores(study, number)
        for objective in self.spec.objectives:
            sign = 1.0 if objective.direction == "maximize" else -1.0
            differences = []
            for item in items:
                if item.probe in objective.probes and (item.probe, item.item_id) in theirs:
                    metric = objective.metric or self.metrics[item.probe]
                    ours, other = item.scores[metric], theirs[(item.probe, item.item_id)][metric]
                    if other is not None and math.isfinite(ours):
                        differences.append(sign * (ours - other))
            if sum(d != 0 for d in differences) < MIN_PAIRS:
                return False
            if wilcoxon(differences, alternative="less").pvalue >= self.p_threshold:
                return False
        return True

    def _member_scores(self, study: str, number: int) -> dict[tuple[str, str], dict]:
        if number not in self._scores:  # a complete trial's items never change
            evaluations = [e for e in self.records.evaluations(study, number, "dev")
                           if e.outcome == "complete"]
            self._scores[number] = {(i.probe, i.item_id): i.scores
                                    for i in (evaluations[-1].items if evaluations else [])}
        return self._scores[number]


def _feasible_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    from search.study import feasible

    return [t for t in study.best_trials if feasible(t)]


def item_pruner(bench: Workbench, records: RecordStore | None
                ) -> WilcoxonItems | DominatedByFront | None:
    """The spec's early stop, or None when pruning is off."""
    pruning = bench.spec.evaluation.pruning
    if not pruning.enabled:
        return None
    if len(bench.spec.directions) == 1:
        return WilcoxonItems(bench)
    if records is None:
        raise ValueError("pruning a Pareto study needs the record store (front members' items)")
    metrics = {name: probe.default_metric for name, probe in bench.suite.probes.items()}
    return DominatedByFront(bench.spec, metrics, records, pruning.p_threshold)
