"""The CLI's verbs as functions: launch, join, status, evaluate, and their text output."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from evaluators.suite import ItemResult, SuiteResult
from mergesearch.errors import MergesearchError, StorageError
from search.selection import ranked_best, select_trial, selected_trial, top_trials
from search.spec import load_spec
from search.study import (
    BASELINE_ATTR,
    Records,
    create_or_resume,
    dev_objectives,
    enqueue_baselines,
    evaluate_on_test,
    finished_count,
    load_study,
    run_trials,
    stored_spec,
    test_results,
)
from search.workbench import Workbench, build_suite, start_engine
from storage.artifacts import default_artifact_dir

log = logging.getLogger(__name__)


def launch_study(spec_path: Path, storage: str | None = None, name: str | None = None,
                 n_trials: int | None = None, timeout: float | None = None,
                 test: bool = True, progress: bool = True) -> str:
    """Check everything, then create or resume the study, run it, and score the best on
    test. Returns a one-paragraph summary."""
    spec = load_spec(spec_path)
    storage = storage or spec.storage
    spec.artifacts = spec.artifacts or default_artifact_dir(storage, spec_path.parent.resolve())
    # stored resolved: the default reads the parents' folders, which may change later
    spec.merge.source = spec.source_parent.name
    bench = Workbench.prepare(spec)  # every user mistake surfaces before storage is touched
    try:
        study = create_or_resume(spec, storage, name or spec.name)
        records = Records.open(storage, spec)
        enqueue_baselines(study, bench)
        run_trials(study, bench, n_trials or spec.budget.n_trials,
                   timeout or spec.budget.timeout, progress, records)
        if test:
            score_chosen_on_test(study, bench, records)
    finally:
        bench.close()
    return (f"study {study.study_name}: {finished_count(study)} finished trials, scored by "
            f"the {bench.engine_name} engine")


def score_chosen_on_test(study, bench: Workbench, records: Records) -> None:
    """Baselines and the top dev trials, on the test split."""
    baselines = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if BASELINE_ATTR in t.user_attrs]
    top = [t.number for t in top_trials(study, bench.spec.evaluation.test_top_k)]
    evaluate_on_test(study, bench, list(dict.fromkeys(baselines + top)), records)


def score_trials_on_test(storage: str, name: str | None, which: str) -> dict[int, dict]:
    """Score a study's chosen trials (`best`, `pareto`, or numbers like `3,17`) on the test
    split, once each, proving their weights; return dev and test objectives by trial."""
    study = load_study(storage, name)
    spec = stored_spec(study)
    if which in ("best", "pareto"):
        chosen = [selected_trial(study)] if which == "best" else ranked_best(study)
        numbers = [t.number for t in chosen if t is not None]
        if not numbers:
            raise StorageError(f"study {study.study_name!r} has no complete trial yet")
    else:
        try:
            numbers = [select_trial(study, int(n)).number for n in which.split(",")]
        except ValueError:
            raise MergesearchError(f"--trials {which!r}: give best, pareto, or trial numbers "
                                   "like 3,17") from None
    bench = Workbench.prepare(spec)
    try:
        evaluate_on_test(study, bench, numbers, Records.open(storage, spec))
    finally:
        bench.close()
    tests = test_results(study)
    trials = study.get_trials(deepcopy=False)
    return {n: {"dev": dev_objectives(trials[n], spec), "test": tests[n]["objectives"]}
            for n in numbers}


def join_study(storage: str, name: str | None, n_trials: int | None,
               timeout: float | None) -> str:
    study = load_study(storage, name, as_worker=True)
    spec = stored_spec(study)
    bench = Workbench.prepare(spec)
    try:
        run_trials(study, bench, n_trials or spec.budget.n_trials,
                   timeout or spec.budget.timeout, records=Records.open(storage, spec))
    finally:
        bench.close()
    return (f"study {study.study_name}: {finished_count(study)} finished trials, scored by "
            f"the {bench.engine_name} engine")


def evaluate_model(spec_path: Path, model: Path, split: str,
                   on_items: Callable[[list[ItemResult]], None] | None = None) -> SuiteResult:
    """Score `model` on the spec's probes; `on_items` gets each chunk's results as they come."""
    spec = load_spec(spec_path)
    suite = build_suite(spec)
    engine = start_engine(spec, model)
    try:
        return suite.evaluate(engine, split, spec.evaluation.chunk_size, on_items)
    finally:
        engine.close()


# ---------------------------------------------------------------- text output


def _fmt(values: dict[str, float] | None, names: list[str]) -> list[str]:
    return [("" if values is None or n not in values else f"{values[n]:.4f}") for n in names]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def status_table(storage: str, name: str | None) -> str:
    study = load_study(storage, name)
    spec = stored_spec(study)
    names = [o.name for o in spec.objectives]
    tests = test_results(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        dev = dev_objectives(t, spec) if t.values else None
        test = tests.get(t.number, {}).get("objectives")
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append([str(t.number), t.state.name.lower(), t.user_attrs.get(BASELINE_ATTR, ""),
                     *_fmt(dev, names), *_fmt(test, names),
                     "" if seconds is None else f"{seconds:.1f}"])
    header = ["trial", "state", "baseline", *[f"dev:{n}" for n in names],
              *[f"test:{n}" for n in names], "seconds"]
    return f"study {study.study_name}\n" + _table(header, rows)


def format_report(report: dict[str, Any]) -> str:
    names = report["objectives"]
    counts = ", ".join(f"{v} {k}" for k, v in report["trials"].items() if v)
    rows = [[b["name"], str(b["trial"]), *_fmt(b["dev"], names), *_fmt(b["test"], names)]
            for b in report["baselines"]]
    rows += [[("selected" if b["trial"] == report["selected"] else "best"), str(b["trial"]),
              *_fmt(b["dev"], names), *_fmt(b["test"], names)] for b in report["best"]]
    header = ["", "trial", *[f"dev:{n}" for n in names], *[f"test:{n}" for n in names]]
    return f"study {report['study']}: {counts}\n" + _table(header, rows)
