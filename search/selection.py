"""Which trial a user means: the best, the Pareto front's knee, a number, or a rule.

Selection reads dev values only (test values are for the user to judge the choice, never to
make it), and never picks a trial that breaks a constraint.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from mergesearch.errors import MergesearchError, StorageError
from search.study import dev_objectives, feasible, stored_spec

TIE_DIGITS = 9  # scores such as k/N tie exactly in arithmetic but not in floats


def _signs(study: optuna.Study) -> list[float]:
    return [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in study.directions]


def _by_signed_mean(study: optuna.Study, trials) -> list[FrozenTrial]:
    """Trials by the mean of their direction-signed study values, best first, then number."""
    signs = _signs(study)

    def key(trial: FrozenTrial) -> tuple[float, int]:
        signed = sum(s * v for s, v in zip(signs, trial.values, strict=True))
        return -round(signed / len(signs), TIE_DIGITS), trial.number

    return sorted(trials, key=key)


def dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[float]) -> bool:
    """Whether values `a` are at least as good as `b` everywhere and better somewhere (a sign
    is 1 for an objective to maximise, -1 to minimise)."""
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a, b, strict=True)]
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def feasible_complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if feasible(t)]


def _front(study: optuna.Study, trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials no other of `trials` dominates, best signed dev mean first."""
    signs = _signs(study)
    return [t for t in _by_signed_mean(study, trials)
            if not any(dominates(o.values, t.values, signs) for o in trials)]


def _best_of(study: optuna.Study, trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The best of `trials` (one objective) or their Pareto set, best signed dev mean first."""
    if len(study.directions) == 1:
        return _by_signed_mean(study, trials)[:1]
    return _front(study, trials)


def ranked_best(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial (one objective) or the feasible Pareto set, best signed dev
    mean first."""
    return _best_of(study, feasible_complete(study))


def knee(study: optuna.Study, front: list[FrozenTrial]) -> FrozenTrial:
    """The front member where the trade-off turns: with each objective scaled to [0, 1] over
    the front (1 the best), the member with the largest sum. For two objectives that is the
    member farthest beyond the line joining the front's two ends (an end, when no member
    lies beyond it). Ties go to the better signed mean, then the lower number."""
    signs = _signs(study)
    signed = {t.number: [s * v for s, v in zip(signs, t.values, strict=True)] for t in front}
    lows = [min(column) for column in zip(*signed.values(), strict=True)]
    highs = [max(column) for column in zip(*signed.values(), strict=True)]

    def scaled_sum(trial: FrozenTrial) -> float:
        return round(sum((v - lo) / (hi - lo) for v, lo, hi
                         in zip(signed[trial.number], lows, highs, strict=True) if hi > lo),
                     TIE_DIGITS)

    ranked = _by_signed_mean(study, front)  # ties: max keeps the first of this order
    return max(ranked, key=scaled_sum)


def recommended(study: optuna.Study, best: list[FrozenTrial]) -> FrozenTrial | None:
    """Of `best` (as `_best_of` ranks it): the best trial, or the knee of the Pareto set."""
    if not best:
        return None
    return best[0] if len(study.directions) == 1 else knee(study, best)


def selected_trial(study: optuna.Study) -> FrozenTrial | None:
    """What the report recommends: the best trial, or the knee of the feasible front."""
    return recommended(study, ranked_best(study))


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """Up to k trials worth a test evaluation: the selected trial (best or knee), the rest of
    the Pareto set, then runners-up."""
    best = ranked_best(study)
    chosen = recommended(study, best)
    ranked = ([chosen] if chosen else []) + [t for t in best if t.number != chosen.number]
    on_front = {t.number for t in best}
    rest = [t for t in feasible_complete(study) if t.number not in on_front]
    return (ranked + _by_signed_mean(study, rest))[:k]


@dataclass
class Rule:
    """`--min NAME=V`, `--max NAME=V` bounds on dev objectives, then `--maximize NAME` or
    `--minimize NAME` (or, without either, the best or knee of what the bounds leave)."""

    at_least: dict[str, float] = field(default_factory=dict)
    at_most: dict[str, float] = field(default_factory=dict)
    optimise: tuple[str, bool] | None = None  # (objective, maximise?)

    @classmethod
    def parse(cls, mins: list[str], maxes: list[str], maximize: str | None,
              minimize: str | None) -> Rule | None:
        if maximize and minimize:
            raise MergesearchError("give --maximize or --minimize, not both")
        if not (mins or maxes or maximize or minimize):
            return None
        optimise = (maximize, True) if maximize else (minimize, False) if minimize else None
        return cls(_bounds(mins, "--min"), _bounds(maxes, "--max"), optimise)

    def names(self) -> set[str]:
        return {*self.at_least, *self.at_most, *([self.optimise[0]] if self.optimise else [])}

    def admits(self, values: dict[str, float]) -> bool:
        return (all(values[n] >= v for n, v in self.at_least.items())
                and all(values[n] <= v for n, v in self.at_most.items()))

    def describe(self) -> str:
        return ", ".join([f"{n} >= {v:g}" for n, v in self.at_least.items()]
                         + [f"{n} <= {v:g}" for n, v in self.at_most.items()])


def _bounds(texts: list[str], option: str) -> dict[str, float]:
    out = {}
    for text in texts:
        match = re.fullmatch(r"\s*([\w.-]+)\s*=\s*([-+0-9.eE]+)\s*", text)
        try:
            out[match.group(1)] = float(match.group(2))  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            raise MergesearchError(f"{option} {text!r}: write OBJECTIVE=VALUE, e.g. "
                                   "instruction=0.9") from None
    return out


def _pick_by_rule(study: optuna.Study, rule: Rule) -> FrozenTrial:
    spec = stored_spec(study)
    names = [o.name for o in spec.objectives]
    unknown = sorted(rule.names() - set(names))
    if unknown:
        raise MergesearchError(f"objective {unknown[0]!r} is not one of this study's: "
                               f"{', '.join(names)}")
    candidates = feasible_complete(study)
    if not candidates:
        raise StorageError(f"study {study.study_name!r} has no complete feasible trial yet")
    values = {t.number: dev_objectives(t, spec) for t in candidates}
    admitted = [t for t in candidates if rule.admits(values[t.number])]
    if not admitted:
        near = ", ".join(f"{n}: best {max(v[n] for v in values.values()):.4f}"
                         for n in rule.at_least)
        raise MergesearchError(f"no complete feasible trial has {rule.describe()} on dev"
                               + (f" ({near})" if near else ""))
    if rule.optimise is None:
        return recommended(study, _best_of(study, admitted))
    name, maximise = rule.optimise
    # the named objective first; ties by the other objectives' signed mean, then number
    ranked = _by_signed_mean(study, admitted)
    return max(ranked, key=lambda t: values[t.number][name] * (1 if maximise else -1))


def select_trial(study: optuna.Study, which: str | int | Rule) -> FrozenTrial:
    """A complete trial by number, `best` (one objective), `knee` (several), or a `Rule`."""
    if isinstance(which, Rule):
        return _pick_by_rule(study, which)
    several = len(study.directions) > 1
    if which in ("best", "knee"):
        if which == "best" and several:
            raise MergesearchError(
                f"study {study.study_name!r} has {len(study.directions)} objectives, so no "
                "single best: choose knee (the Pareto front's knee), a trial number, or a "
                "rule such as --min instruction=0.9 --maximize clinical")
        if which == "knee" and not several:
            raise MergesearchError(f"study {study.study_name!r} has one objective: its "
                                   "best trial is `best`; knee is for Pareto studies")
        chosen = selected_trial(study)
        if chosen is None:
            raise StorageError(f"study {study.study_name!r} has no complete feasible trial yet")
        return chosen
    trials = study.get_trials(deepcopy=False)
    number = int(which)
    if not 0 <= number < len(trials):
        raise StorageError(f"study {study.study_name!r} has no trial {number} "
                           f"(trials 0 to {len(trials) - 1})")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        state = {TrialState.FAIL: "failed", TrialState.RUNNING: "still running"}.get(
            trial.state, trial.state.name.lower())
        raise StorageError(f"trial {number} of study {study.study_name!r} is {state}, not "
                           "complete; choose a complete trial")
    return trial
