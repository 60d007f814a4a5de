"""Stopping a hopeless trial between evaluation chunks, from its per-item scores.

One objective (or `combine: weighted`): Optuna's WilcoxonPruner, fed one step per item, tests
the trial's items against the best trial's on the same items.

Several objectives (a Pareto study), which Optuna does not prune: the trial is stopped when a
member of the current Pareto front dominates it with evidence. For each front member and
each objective, one-sided paired t-tests of the trial's item scores against the member's on
the same items ask whether the trial's mean is worse (differences below 0) and whether it is
at most `margin` better (differences below `margin`). The member dominates when every
objective passes the second test and at least one passes the first, all at `p_threshold`
(an intersection-union test). With `margin` 0 that is strict dominance on every objective,
which few items rarely show when a binary metric ties; a small margin also stops trials that
tie the member on some objective, at the price of possibly stopping a trial that is better
than the member by less than `margin` there. bench/pareto_pruning.py measures the saving and
whether the front is kept.
"""

from __future__ import annotations

import math

import optuna
from scipy.stats import ttest_1samp

from evaluators.suite import ItemResult
from search.spec import StudySpec
from search.workbench import Workbench
from storage.records import RecordStore

PRUNED_BY_ATTR = "pruned_by"
MIN_PAIRS = 6  # items with a difference an objective needs before it counts as evidence


class WilcoxonItems:
    """One objective: each item a step for Optuna's WilcoxonPruner."""

    def __init__(self, bench: Workbench):
        self.bench = bench

    def observe(self, trial: optuna.Trial, items: list[ItemResult], new: int) -> None:
        for step in range(len(items) - new, len(items)):
            trial.report(self.bench.item_value(items[step]), step)

    def check(self, trial: optuna.Trial, items: list[ItemResult]) -> str | None:
        del items  # reported by observe
        return "its items score below the best trial's" if trial.should_prune() else None


class DominatedByFront:
    """Several objectives: stop the trial once a Pareto-front member dominates it.
    `metrics` gives each probe's default metric (an objective without one uses it)."""

    def __init__(self, spec: StudySpec, metrics: dict[str, str], records: RecordStore,
                 p_threshold: float, margin: float = 0.0):
        self.spec, self.metrics = spec, metrics
        self.records, self.p_threshold, self.margin = records, p_threshold, margin
        self._scores: dict[int, dict[tuple[str, str], dict[str, float]]] = {}

    def observe(self, trial: optuna.Trial, items: list[ItemResult], new: int) -> None:
        pass  # the evaluations table holds the front members' items

    def check(self, trial: optuna.Trial, items: list[ItemResult]) -> str | None:
        for member in _feasible_front(trial.study):
            if self._dominates(member.number, trial.study.study_name, items):
                trial.set_user_attr(PRUNED_BY_ATTR, member.number)
                return f"trial {member.number} of the Pareto front dominates it"
        return None

    def _dominates(self, number: int, study: str, items: list[ItemResult]) -> bool:
        theirs = self._member_scores(study, number)
        worse_somewhere = False
        for objective in self.spec.objectives:
            differences = self._differences(objective, theirs, items)
            if len(differences) < MIN_PAIRS:
                return False
            if not self._below(differences, self.margin):
                return False
            worse_somewhere = worse_somewhere or self._below(differences, 0.0)
        return worse_somewhere

    def _differences(self, objective, theirs: dict, items: list[ItemResult]) -> list[float]:
        """Per item: the trial's score minus the member's, signed so that below 0 is worse."""
        sign = 1.0 if objective.direction == "maximize" else -1.0
        out = []
        for item in items:
            if item.probe in objective.probes and (item.probe, item.item_id) in theirs:
                metric = objective.metric or self.metrics[item.probe]
                ours, other = item.scores[metric], theirs[(item.probe, item.item_id)][metric]
                if other is not None and math.isfinite(ours):
                    out.append(sign * (ours - other))
        return out

    def _below(self, differences: list[float], shift: float) -> bool:
        """Is the mean difference below `shift`, at `p_threshold`? A t-test of the mean,
        as the objective is a mean: a signed-rank test, about the median, calls a trial with
        mostly tied items and a few far better ones "not better" and stopped front members
        (bench/pareto_pruning.py, docs/benchmarks.md)."""
        shifted = [d - shift for d in differences]
        if sum(d != 0 for d in shifted) < MIN_PAIRS or len(set(shifted)) == 1:
            return False  # too few informative items, or no spread to judge the mean by
        return ttest_1samp(shifted, 0.0, alternative="less").pvalue < self.p_threshold

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
    return DominatedByFront(bench.spec, metrics, records, pruning.p_threshold, pruning.margin)
