"""Creating, resuming and running a study, and scoring chosen trials on the test split.

The spec is stored with the study (a study user attribute), so a worker needs only the
storage URL and the study name. A new study is warm-started with the parents themselves
and their uniform average, marked as baselines, so every study holds its own reference
points. Budgets count finished trials of the whole study, so several workers and resumed
launches stop together at `n_trials` (each worker finishes the trial it has in flight, so
a study with W workers may end with up to W - 1 more).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from evaluators.suite import ItemResult
from mergesearch.errors import SpecError, StorageError
from merging import MergeRecipe
from search.item_pruning import item_pruner
from search.spec import SAMPLERS_WITH_CONSTRAINTS, StudySpec, parse_spec
from search.workbench import Workbench
from storage import open_storage, study_names
from storage.artifacts import artifact_store, default_artifact_dir, upload_jsonl
from storage.records import RecordStore, now

log = logging.getLogger(__name__)

SPEC_ATTR = "spec"
BASELINE_ATTR = "baseline"
OBJECTIVES_ATTR = "objectives"
CONSTRAINTS_ATTR = "constraints"
FAIL_REASON_ATTR = "fail_reason"
ITEMS_ATTR = "items_evaluated"
PRUNE_REASON_ATTR = "prune_reason"
TEST_ATTR_PREFIX = "test:"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Spec sections that define what a study's trial values mean; the rest may change on resume.
_IDENTITY = ("parents", "merge", "probes", "objectives", "combine", "constraints")


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded. Trials set their constraints (`Trial.set_constraint`),
    which TPE, GP and NSGA-II honour; the others search regardless, and the report still
    leaves infeasible trials out."""
    name, startup = spec.sampler.name, spec.sampler.n_startup_trials
    if spec.constraints and name not in SAMPLERS_WITH_CONSTRAINTS:
        log.warning("sampler %s does not take constraints into account", name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
        if name == "grid":
            return optuna.samplers.GridSampler(grid_space(spec), seed=seed)
        # group: a study over several methods has a conditional space, modelled per method
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True,
            group=len(spec.merge.methods) > 1)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    pruning = spec.evaluation.pruning
    if not pruning.enabled:
        return optuna.pruners.NopPruner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.WilcoxonPruner(p_threshold=pruning.p_threshold)


def grid_space(spec: StudySpec) -> dict[str, list[float]]:
    """`grid_points` evenly spaced values of every dimension of the spec's search space."""
    from merging.parents import Parents
    from search.space import SearchSpace

    layout = Parents({p.name: p.path for p in spec.parents}, "mmap").layout  # headers only
    n = spec.sampler.grid_points
    return {d.name: [d.low + (d.high - d.low) * i / (n - 1) for i in range(n)]
            for d in SearchSpace(spec, layout).dimensions}


def resolve_study_name(storage: optuna.storages.BaseStorage, name: str | None) -> str:
    """`name`, or the only study in the storage when no name is given."""
    names = study_names(storage)
    if name is not None:
        if name not in names:
            raise StorageError(f"storage has no study {name!r} (studies: "
                               f"{', '.join(names) or 'none'})")
        return name
    if len(names) == 1:
        return names[0]
    raise StorageError("the storage holds " + (f"{len(names)} studies ({', '.join(names)}); "
                       "name one with --study" if names else "no study"))


def _spec_from_attrs(attrs: dict, name: str) -> StudySpec:
    if SPEC_ATTR not in attrs:
        raise StorageError(f"study {name!r} was not made by mergesearch (no spec)")
    return parse_spec(attrs[SPEC_ATTR], f"spec stored with study {name!r}")


def stored_spec(study: optuna.Study) -> StudySpec:
    return _spec_from_attrs(study.user_attrs, study.study_name)


def artifact_folder(storage: optuna.storages.BaseStorage, url: str) -> Path:
    """The artifact folder the storage's studies name in their specs (the default for the
    URL when none does)."""
    folders = sorted({str(s.user_attrs[SPEC_ATTR]["artifacts"])
                      for s in storage.get_all_studies()
                      if (s.user_attrs.get(SPEC_ATTR) or {}).get("artifacts")})
    if len(folders) > 1:
        log.warning("studies keep artifacts in %s; showing %s (choose with --artifacts)",
                    ", ".join(folders), folders[0])
    return Path(folders[0]) if folders else default_artifact_dir(url, Path.cwd())


def load_study(storage_url: str, name: str | None, as_worker: bool = False) -> optuna.Study:
    """The named (or only) study. `as_worker` gives it the stored spec's sampler, seeded
    apart from the launcher's, for running trials."""
    storage = open_storage(storage_url, create=False)
    name = resolve_study_name(storage, name)
    sampler, pruner = None, None
    if as_worker:
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
        spec = _spec_from_attrs(attrs, name)
        sampler, pruner = make_sampler(spec, worker_seed(spec.seed)), make_pruner(spec)
        storage = open_storage(storage_url, create=False, heartbeat=spec.heartbeat)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


def create_or_resume(spec: StudySpec, storage_url: str, name: str) -> optuna.Study:
    storage = open_storage(storage_url, heartbeat=spec.heartbeat)
    if name in study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        _check_same_study(study, spec)
        done = len(study.trials)
        log.info("resuming study %s (%d trials so far)", name, done)
        # A resumed sampler seeded as the first launch would replay its proposals.
        sampler = make_sampler(spec, (spec.seed + 7919 * done) % 2**31)
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                                 pruner=make_pruner(spec))
    try:
        study = optuna.create_study(study_name=name, storage=storage,
                                    sampler=make_sampler(spec, spec.seed),
                                    pruner=make_pruner(spec),
                                    directions=spec.directions)
    except optuna.exceptions.DuplicatedStudyError:  # another launcher won the race
        return create_or_resume(spec, storage_url, name)
    study.set_user_attr(SPEC_ATTR, spec.to_json_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(spec.metric_names)
    log.info("created study %s", name)
    return study


def _check_same_study(study: optuna.Study, spec: StudySpec) -> None:
    old, new = stored_spec(study).to_json_dict(), spec.to_json_dict()
    for section in _IDENTITY:
        if old[section] != new[section]:
            raise SpecError(
                f"study {study.study_name!r} already exists with a different `{section}`; "
                "its trials would not be comparable. Give this spec another study name "
                "(--study NAME or `name:`), or restore the section"
            )


def enqueue_baselines(study: optuna.Study, bench: Workbench) -> None:
    """Queue each parent alone, the uniform average and the user's warm-start recipes,
    unless the study already has that baseline done, queued or running (a failed or
    interrupted one is queued again)."""
    alive = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    present = {t.user_attrs.get(BASELINE_ATTR)
               for t in study.get_trials(deepcopy=False, states=alive)}
    for name, params in {**bench.space.baselines(), **bench.warm_starts}.items():
        if name not in present:
            study.enqueue_trial(params, user_attrs={BASELINE_ATTR: name})


@dataclass
class Records:
    """Where a worker writes what each evaluation did: mergesearch's tables, and the items as
    an Optuna artifact (of the trial while it runs, of the study for a test split)."""

    store: RecordStore
    artifacts: optuna.artifacts.FileSystemArtifactStore

    @classmethod
    def open(cls, storage_url: str, spec: StudySpec) -> Records:
        folder = spec.artifacts or default_artifact_dir(storage_url, Path.cwd())
        return cls(RecordStore.open(storage_url), artifact_store(Path(folder)))

    def evaluation(self, study: optuna.Study, number: int, split: str, bench: Workbench,
                   outcome: str, started: datetime, items: list[ItemResult],
                   weights_sha256: str | None, attach_to: optuna.Trial | optuna.Study,
                   error: str | None = None) -> None:
        self.store.record_evaluation(study.study_name, number, split, bench.engine_name,
                                     outcome, started, items, weights_sha256, error)
        on_study = attach_to is study
        name = f"trial-{number}-{split}-items.jsonl" if on_study else f"{split}-items.jsonl"
        upload_jsonl(self.artifacts, name, (i.to_dict() for i in items), attach_to)


class TrialFailed(Exception):
    """A trial's merge or evaluation failed; the study records why and goes on."""


MAX_CONSECUTIVE_FAILURES = 5


class SafeInterrupt:
    """Ctrl-C during a study takes effect between evaluation chunks or between trials, never
    inside a database write (where it could leave SQLite locked and the process hung); a
    second Ctrl-C interrupts at once. Also an Optuna callback, checked after each trial."""

    def __init__(self) -> None:
        self.requested, self.previous = False, None

    def __enter__(self) -> SafeInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt requested: stopping after the current chunk (Ctrl-C again to "
                    "stop at once)")

    def check(self, *_) -> None:
        if self.requested:
            raise KeyboardInterrupt

    __call__ = check


def _score(bench: Workbench, trial: optuna.Trial, recipe: MergeRecipe,
           records: Records | None, interrupt: SafeInterrupt | None = None):
    """Score on dev, item by item to the pruner; record the evaluation however it ends."""
    min_items = bench.spec.evaluation.pruning.min_items
    pruner = item_pruner(bench, records.store if records else None)
    items: list[ItemResult] = []

    baseline = BASELINE_ATTR in trial.user_attrs  # the reference points are never stopped

    def on_items(chunk: list[ItemResult]) -> None:
        if interrupt is not None:
            interrupt.check()
        items.extend(chunk)
        trial.set_user_attr(ITEMS_ATTR, len(items))
        if pruner is None:
            return
        pruner.observe(trial, items, len(chunk))  # every item, so later trials compare to all
        seen = len(items)
        if baseline or seen < min_items or seen >= bench.items_per_trial:
            return
        why = pruner.check(trial, items)
        if why is not None:
            trial.set_user_attr(PRUNE_REASON_ATTR, why)
            raise optuna.TrialPruned(f"pruned after {seen} of {bench.items_per_trial} items: "
                                     f"{why}")

    started, outcome, digest, error = now(), "failed", None, None
    try:
        digest, result = bench.score(recipe, "dev", on_items)
        outcome = "complete"
        return digest, result
    except optuna.TrialPruned:
        outcome = "pruned"
        raise
    except Exception as e:  # out of memory, a recipe the merger refuses, an engine error
        if interrupt is not None and interrupt.requested:
            # Ctrl-C at a terminal reaches the engine's own processes too, and vLLM's stop at
            # once: the trial's error is then the interrupt's doing, not the recipe's.
            error = "interrupted"
            raise KeyboardInterrupt from e
        error = f"{type(e).__name__}: {e}"
        trial.set_user_attr(FAIL_REASON_ATTR, error[:2000])
        bench.recover()
        raise TrialFailed(error) from e
    finally:
        if records is not None:
            records.evaluation(trial.study, trial.number, "dev", bench, outcome, started, items,
                               digest, trial, error)


def make_objective(bench: Workbench, records: Records | None = None,
                   interrupt: SafeInterrupt | None = None
                   ) -> Callable[[optuna.Trial], list[float]]:
    def objective(trial: optuna.Trial) -> list[float]:
        recipe = bench.space.suggest(trial)
        trial.set_user_attr("recipe", recipe.to_dict())
        weights_hash, result = _score(bench, trial, recipe, records, interrupt)
        for key, value in bench.weights_attrs(weights_hash).items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("dev_probes", result.probes)
        objectives = bench.objectives(result)
        trial.set_user_attr(OBJECTIVES_ATTR, objectives)
        log.info("trial %d dev %s", trial.number, json.dumps(objectives))
        broken = [name for name, value in objectives.items() if not math.isfinite(value)]
        if broken:
            trial.set_user_attr(FAIL_REASON_ATTR, f"objective {broken[0]} is not finite")
            raise TrialFailed(f"objective {broken[0]} is {objectives[broken[0]]}")
        if bench.spec.constraints:
            values = constraint_values(trial.study, bench.spec, objectives,
                                       trial.user_attrs.get(BASELINE_ATTR))
            trial.set_user_attr(CONSTRAINTS_ATTR, values)
            for i, value in enumerate(values):
                trial.set_constraint(f"{i}:{bench.spec.constraints[i].objective}", value)
        return bench.spec.study_values(objectives)

    return objective


def constraint_values(study: optuna.Study, spec: StudySpec, objectives: dict[str, float],
                      baseline: str | None) -> list[float]:
    """One value per constraint, feasible when <= 0. A bound relative to a parent uses that
    parent's baseline trial (this trial's own values when it is that baseline); until the
    baseline is complete the constraint counts as met."""
    parent_values: dict[str, dict[str, float]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if BASELINE_ATTR in t.user_attrs and OBJECTIVES_ATTR in t.user_attrs:
            parent_values[t.user_attrs[BASELINE_ATTR]] = t.user_attrs[OBJECTIVES_ATTR]
    if baseline is not None:
        parent_values[baseline] = objectives
    values = []
    for c in spec.constraints:
        bound = c.at_least if c.at_least is not None else c.at_most
        if c.of_parent is not None:
            reference = parent_values.get(c.of_parent)
            if reference is None:
                log.info("constraint on %s: parent %s not scored yet", c.objective, c.of_parent)
                values.append(0.0)
                continue
            bound *= reference[c.objective]
        value = objectives[c.objective]
        values.append(bound - value if c.at_least is not None else value - bound)
    return values


def dev_objectives(trial: optuna.trial.FrozenTrial, spec: StudySpec) -> dict[str, float]:
    """A complete trial's dev value of each objective, by name; none for a pruned trial
    (Optuna stores its last item's value as its value, which is no objective's)."""
    if OBJECTIVES_ATTR in trial.user_attrs:
        return trial.user_attrs[OBJECTIVES_ATTR]
    if trial.state != TrialState.COMPLETE:
        return {}
    return dict(zip([o.name for o in spec.objectives], trial.values, strict=True))


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.user_attrs.get(CONSTRAINTS_ATTR, []))


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_trials(study: optuna.Study, bench: Workbench, n_trials: int | None,
               timeout: float | None, progress: bool = True,
               records: Records | None = None) -> None:
    """Run trials until the study holds `n_trials` finished ones or `timeout` seconds pass."""
    callbacks = []
    if n_trials is not None:
        if n_trials - finished_count(study) <= 0:
            log.info("study %s already has %d finished trials", study.study_name, n_trials)
            return
        callbacks.append(MaxTrialsCallback(n_trials, states=FINISHED))
    callbacks.append(_StopAfterFailures(MAX_CONSECUTIVE_FAILURES))
    # No trial count here: failed trials do not count towards the budget, the callback stops
    # at `n_trials` finished ones (of all workers), and repeated failures stop the worker.
    with SafeInterrupt() as interrupt:
        study.optimize(make_objective(bench, records, interrupt), timeout=timeout,
                       callbacks=[*callbacks, interrupt],
                       show_progress_bar=progress and timeout is not None, catch=(TrialFailed,))


class _StopAfterFailures:
    """Stop this worker after `limit` failed trials in a row: something is wrong with every
    candidate (a broken engine, a space of invalid recipes), not with one of them."""

    def __init__(self, limit: int):
        self.limit, self.failures = limit, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.failures = self.failures + 1 if trial.state == TrialState.FAIL else 0
        if self.failures >= self.limit:
            log.error("stopping: the last %d trials failed (last: %s)", self.failures,
                      trial.user_attrs.get(FAIL_REASON_ATTR, "see the log"))
            study.stop()


def worker_seed(seed: int) -> int:
    """Workers must not propose the launcher's or each other's sequence: the process id is
    no help in containers (every worker is PID 1), so each worker draws fresh bits."""
    return (seed * 1_000_003 + int.from_bytes(os.urandom(4), "little")) % 2**31


# ---------------------------------------------------------------- test split


def test_results(study: optuna.Study) -> dict[int, dict]:
    """Test-split results by trial number, read in one storage query."""
    return {int(key.removeprefix(TEST_ATTR_PREFIX)): value
            for key, value in study.user_attrs.items() if key.startswith(TEST_ATTR_PREFIX)}


def evaluate_on_test(study: optuna.Study, bench: Workbench, numbers: list[int],
                     records: Records | None = None) -> None:
    """Score trials on the test split (once each), proving the weights are the scored ones.

    Results are study attributes `test:<trial number>`: a finished trial is immutable.
    """
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    done = test_results(study)
    for number in numbers:
        if number in done:
            continue
        trial = trials[number]
        recipe = recipe_of(trial)
        started = now()
        weights_hash, result = bench.score(recipe, "test")
        unverified = verify_weights(trial, weights_hash, bench.weights_attrs(weights_hash))
        if unverified:
            log.warning("trial %d: test-split weights not verified: %s", number, unverified)
        if records is not None:
            records.evaluation(study, number, "test", bench, "complete", started, result.items,
                               weights_hash, study)
        study.set_user_attr(f"{TEST_ATTR_PREFIX}{number}",
                            {"objectives": result.objectives, "probes": result.probes})
        log.info("trial %d test %s", number, json.dumps(result.objectives))


def verify_weights(trial: optuna.trial.FrozenTrial, digest: str, rebuilt: dict[str, str]
                   ) -> str | None:
    """Check rebuilt weights (hash `digest`, made as `rebuilt` records) against those the
    trial scored: raise if they differ, return why they cannot be compared, or None."""
    recorded = trial.user_attrs
    if recorded.get("weights_hash_format", "v1") != rebuilt["weights_hash_format"]:
        return (f"the trial's hash is in format {recorded.get('weights_hash_format', 'v1')}, "
                f"this mergesearch computes {rebuilt['weights_hash_format']}")
    kinds = recorded.get("weights_device", "cpu"), rebuilt["weights_device"]
    if kinds[0] != kinds[1]:
        return (f"the trial was merged on {kinds[0]} and is rebuilt on {kinds[1]}, whose "
                "arithmetic and random masks differ; rebuild on the same kind of device")
    if recorded.get("weights_dtype") != rebuilt["weights_dtype"]:
        return f"the trial was stored as {recorded.get('weights_dtype')}"
    if digest != recorded.get("weights_sha256"):
        raise StorageError(
            f"trial {trial.number}: rebuilt weights hash to {digest[:16]}…, not the "
            f"{str(recorded.get('weights_sha256'))[:16]}… recorded when it was scored; the "
            "parents on disk are not the ones the study used"
        )
    return None


def recipe_of(trial: optuna.trial.FrozenTrial) -> MergeRecipe:
    if "recipe" not in trial.user_attrs:
        raise StorageError(f"trial {trial.number} has no recipe (state {trial.state.name})")
    return MergeRecipe.from_dict(trial.user_attrs["recipe"])
