"""Workers on one study: trials per hour with N workers against one, on a workload of fixed
trial cost, over a PostgreSQL store.

Each worker is its own OS process (multiprocessing, spawn) that joins the study the way
`mergesearch worker` does: `load_study(url, name, as_worker=True)` (the stored spec's sampler,
TPE multivariate with constant liar, seeded by `worker_seed`; `open_storage` with the spec's
heartbeat), then `run_trials`, which runs the project's own objective (`make_objective`:
`SearchSpace.suggest`, the recipe, weights and objective user attributes, `tell`), with
`MaxTrialsCallback` and the stop-after-failures callback, and (where this checkout has them)
the evaluation records a worker writes: a row per evaluation with its items in mergesearch's
tables, and the items as an Optuna artifact of the trial. The study is created and its
baselines enqueued as `mergesearch launch` does (`create_or_resume`, `enqueue_baselines`),
by default in a fresh database on --url's server, dropped at the end.

Only the merge and the scoring are replaced: the workbench's `score` is `time.sleep(T)`,
standing in for merge + evaluation on a GPU, so the trial cost is the same with 1 and with 4
workers whatever the CPU (a CPU-bound stand-in on a 2-core machine would measure core
contention, not the study's machinery). Its two objective values come from a fixed smooth
function of the parameters (as in bench/orchestration.py), so TPE has something to model.

Workers wait on a common start, run for --duration seconds each (Optuna's timeout: a worker
starts no trial after it, and finishes the one in flight), then the study is checked: every
trial number unique, no trial handed to two workers, the finished count equal to the sum of
the workers' own counts, nothing left RUNNING or WAITING, each baseline run once, one recorded
evaluation with all its items per finished trial. The studies made here are deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_URL = os.environ.get("MERGESEARCH_TEST_POSTGRESQL",
                             "postgresql://postgres@127.0.0.1:5432/test")
SPEC_PATH = REPO / "search/demo/assets/spec.yaml"
PARTS = {"ask": "ask (sampler)", "suggest": "suggest (params)", "attrs": "user attrs",
         "records": "records + items artifact", "tell": "tell", "budget": "budget callback",
         "stale": "stale-trial check"}
BUDGET_UNLIMITED = 10**9  # duration mode: MaxTrialsCallback is on (as in a real run), never hit


# ---------------------------------------------------------------- the fixed-cost workbench


class _RecordingSpace:
    """The real SearchSpace; remembers the last trial's parameters for the fake scores."""

    def __init__(self, space, bench):
        self._space, self._bench = space, bench

    def suggest(self, trial):
        recipe = self._space.suggest(trial)
        self._bench.last_params = [trial.params[d.name] for d in self._space.dimensions]
        return recipe

    def __getattr__(self, name):
        return getattr(self._space, name)


class FixedCostBench:
    """What `make_objective` and `run_trials` use of a `Workbench`, with a merge + scoring of
    fixed cost: `time.sleep(seconds)` in all, spread over the suite's dev chunks, each chunk's items
    (the demo probes' dev items, with a made-up output and score) passed to `on_items` as
    the real suite does."""

    def __init__(self, spec, seconds: float):
        from merging import Parents
        from search.space import SearchSpace
        from search.workbench import build_suite

        self.spec, self.seconds = spec, seconds
        layout = Parents({p.name: p.path for p in spec.parents}, "mmap").layout
        self.space = _RecordingSpace(SearchSpace(spec, layout), self)
        self.warm_starts: dict[str, dict[str, float]] = {}
        self.last_params: list[float] = []
        suite = build_suite(spec)  # reads the probes' files only
        size = spec.evaluation.chunk_size
        self.chunks = [(name, probe.items("dev")[i : i + size])
                       for name, probe in suite.probes.items()
                       for i in range(0, len(probe.items("dev")), size)]
        self.metric = {name: probe.default_metric for name, probe in suite.probes.items()}
        self.items_per_trial = sum(len(chunk) for _, chunk in self.chunks)
        self.engine_name = "sleep:cuda:float32"
        self.calls: list[tuple[float, float, float]] = []  # perf_counter in, out; slept

    def score(self, recipe, split, on_items=None):
        from evaluators.suite import ItemResult, SuiteResult

        began, slept = time.perf_counter(), 0.0
        x = self.last_params or [0.5]
        values = [sum(math.sin(3 * v + i) for i, v in enumerate(x)) / len(x),
                  sum(math.cos(2 * v - i) for i, v in enumerate(x)) / len(x)]
        names = [o.name for o in self.spec.objectives]
        objectives = dict(zip(names, values, strict=True))
        by_probe = {p: objectives[o.name] for o in self.spec.objectives for p in o.probes}
        items = []
        for probe, chunk in self.chunks:
            before = time.perf_counter()
            time.sleep(self.seconds / len(self.chunks))
            slept += time.perf_counter() - before
            results = [ItemResult(probe, item.id, split, item.prompt, "generated output " * 12,
                                  {self.metric[probe]: by_probe[probe]},
                                  self.seconds / self.items_per_trial) for item in chunk]
            items.extend(results)
            if on_items is not None:
                on_items(results)
        probes = {p: {self.metric[p]: v} for p, v in by_probe.items()}
        digest = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()
        self.calls.append((began, time.perf_counter(), slept))
        return digest, SuiteResult(items=items, probes=probes, objectives=objectives)

    def weights_attrs(self, digest: str) -> dict[str, str]:
        from merging.materializer import WeightsHash

        return {"weights_sha256": digest, "weights_dtype": "float32", "weights_device": "cuda",
                "weights_hash_format": WeightsHash.FORMAT}

    def objectives(self, result) -> dict[str, float]:
        return {o.name: result.objectives[o.name] for o in self.spec.objectives}

    def recover(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- one worker process


def worker_main(url: str, study_name: str, seconds: float, duration: float | None,
                n_trials: int | None, records: bool, ready, go, start_at, results) -> None:
    """A worker process: join the study, wait for the common start, run trials, report."""
    try:
        import optuna
        import optuna.study._optimize as optimize_module

        from search.study import MaxTrialsCallback, load_study, run_trials, stored_spec, worker_seed

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = load_study(url, study_name, as_worker=True)
        bench = FixedCostBench(stored_spec(study), seconds)
        timings: dict[str, list[float]] = {k: [] for k in PARTS}
        trial_ids: list[int] = []

        def timed(part, func, record=None):
            def wrapper(*args, **kwargs):
                began = time.perf_counter()
                try:
                    out = func(*args, **kwargs)
                finally:
                    timings[part].append(time.perf_counter() - began)
                if record is not None:
                    record(out)
                return out
            return wrapper

        # Time each step a trial takes besides its fixed cost, where Optuna and mergesearch
        # look the functions up at call time.
        study.ask = timed("ask", study.ask, lambda trial: trial_ids.append(trial._trial_id))
        optimize_module._tell_with_warning = timed("tell", optimize_module._tell_with_warning)
        optuna.storages.fail_stale_trials = timed("stale", optuna.storages.fail_stale_trials)
        optuna.trial.Trial.set_user_attr = timed("attrs", optuna.trial.Trial.set_user_attr)
        MaxTrialsCallback.__call__ = timed("budget", MaxTrialsCallback.__call__)
        bench.space.suggest = timed("suggest", bench.space.suggest)
        extra = {}
        if records:
            import search.study as study_module

            extra["records"] = study_module.Records.open(url, bench.spec)
            study_module.Records.evaluation = timed("records", study_module.Records.evaluation)
        ready.put(os.getpid())
        go.wait()
        while time.time() < start_at.value:
            time.sleep(0.001)
        began, cpu0 = time.perf_counter(), time.process_time()
        run_trials(study, bench, n_trials if n_trials is not None else BUDGET_UNLIMITED,
                   duration, progress=False, **extra)
        ended, cpu = time.perf_counter(), time.process_time() - cpu0
        calls = bench.calls  # between trials: from one trial's last sleep to the next's first
        gaps = [calls[i + 1][0] - calls[i][1] + (calls[i][1] - calls[i][0] - calls[i][2])
                for i in range(len(calls) - 1)]
        results.put({"pid": os.getpid(), "seed": worker_seed(bench.spec.seed),
                     "trial_ids": trial_ids, "scored": len(calls), "timings": timings,
                     "gaps": gaps,
                     "slept": sum(c[2] for c in calls), "wall": ended - began,
                     "cpu": cpu, "end_wall": time.time(), "error": None})
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put({"pid": os.getpid(), "error": traceback.format_exc()})


# ---------------------------------------------------------------- one run of N workers


def run_once(url: str, workers: int, seconds: float, duration: float | None,
             n_trials: int | None, artifacts: Path | None) -> dict:
    """One study run by `workers` processes; `artifacts`: record each evaluation (the
    project's tables and an items artifact, as `mergesearch worker` does), or None."""
    import optuna
    from optuna.trial import TrialState

    from search.spec import load_spec
    from search.study import BASELINE_ATTR, create_or_resume, enqueue_baselines
    from storage import open_storage

    spec = load_spec(SPEC_PATH)
    if artifacts is not None:
        spec.artifacts = artifacts
    name = f"bench-workers-{workers}w-{uuid.uuid4().hex[:8]}"
    study = create_or_resume(spec, url, name)
    records = None
    if artifacts is not None:  # as `launch` does: the tables exist before workers join
        from search.study import Records

        records = Records.open(url, spec)
    bench = FixedCostBench(spec, seconds)
    enqueue_baselines(study, bench)
    n_baselines = len(bench.space.baselines())
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=worker_main, args=(url, name, seconds, duration, n_trials,
                                                    records is not None, ready, go, start_at,
                                                    results))
             for _ in range(workers)]
    try:
        for p in procs:
            p.start()
        for _ in range(workers):  # every worker has imported, loaded the study, built its space
            ready.get(timeout=600)
        start_at.value = time.time() + 1.0
        load0 = os.getloadavg()[0]
        go.set()
        reports = [results.get(timeout=(duration or 3600) + 600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        load1 = os.getloadavg()[0]
        errors = [r["error"] for r in reports if r["error"]]
        if errors:
            raise RuntimeError("a worker failed:\n" + "\n".join(errors))
        wall = max(r["end_wall"] for r in reports) - start_at.value

        # ------------------------------------------------ correctness, from the store
        storage = open_storage(url)
        check = optuna.load_study(study_name=name, storage=storage)
        trials = check.get_trials(deepcopy=False)
        by_state = {s.name: sum(t.state == s for t in trials) for s in TrialState}
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        numbers = [t.number for t in trials]
        asked = [i for r in reports for i in r["trial_ids"]]
        db_ids = {t._trial_id for t in trials}
        baseline_runs = [t.user_attrs[BASELINE_ATTR] for t in finished
                         if BASELINE_ATTR in t.user_attrs]
        params = [tuple(sorted(t.params.items())) for t in finished
                  if BASELINE_ATTR not in t.user_attrs]
        checks = {
            "numbers unique": len(set(numbers)) == len(numbers),
            "numbers 0..n-1": sorted(numbers) == list(range(len(numbers))),
            "no trial asked twice": len(set(asked)) == len(asked),
            "asked = stored": set(asked) == db_ids,
            "finished = sum of workers'": len(finished) == sum(r["scored"] for r in reports),
            "none RUNNING": by_state["RUNNING"] == 0,
            "none WAITING": by_state["WAITING"] == 0,
            "none FAIL": by_state["FAIL"] == 0,
            "each baseline once": sorted(baseline_runs) == sorted(bench.space.baselines()),
            "all values stored": all(t.values is not None and len(t.values) == 2
                                     for t in finished),
            "recipe attr on all": all("recipe" in t.user_attrs for t in finished),
        }
        if records is not None:
            evaluations = records.store.evaluations(name, split="dev")
            checks["one dev evaluation per trial"] = (
                sorted(e.trial for e in evaluations if e.outcome == "complete")
                == sorted(t.number for t in finished)
                and all(e.outcome == "complete" for e in evaluations))
            checks["all items recorded"] = all(len(e.items) == bench.items_per_trial
                                               for e in evaluations)
            checks["items artifact on all"] = all(
                any(k.startswith("artifacts:") for k in t.system_attrs) for t in finished)
        duplicate_params = len(params) - len(set(params))
        storage.engine.dispose()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        try:
            cleanup = open_storage(url)
            optuna.delete_study(study_name=name, storage=cleanup)
            cleanup.engine.dispose()
            if records is not None:  # its items go with it (ON DELETE CASCADE)
                import sqlalchemy

                from storage.records import Evaluation

                with records.store.engine.begin() as connection:
                    connection.execute(sqlalchemy.delete(Evaluation).where(
                        Evaluation.study == name))
                records.store.engine.dispose()
        except Exception as e:  # noqa: BLE001
            print(f"warning: could not delete study {name}: {e}", file=sys.stderr)
    return {"workers": workers, "study": name, "reports": reports, "wall": wall,
            "finished": len(finished), "by_state": by_state, "checks": checks,
            "duplicate_params": duplicate_params, "baselines": n_baselines,
            "load": (load0, load1)}


# ---------------------------------------------------------------- output


def _ms(values: list[float], q: float | None = None) -> str:
    if not values:
        return "-"
    if q is None:
        return f"{statistics.median(values) * 1000:.0f}"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.0f}"


def server_version(url: str) -> str:
    import sqlalchemy

    from storage import normalize_url

    engine = sqlalchemy.create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text("select version()")).scalar().split(",")[0]
    finally:
        engine.dispose()


@contextlib.contextmanager
def fresh_database(url: str):
    """A new, empty database on `url`'s server (its URL), dropped afterwards."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from storage import normalize_url

    parsed = make_url(normalize_url(url))
    name = f"mergesearch_bench_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(parsed, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def records_available() -> bool:
    import inspect

    import search.study

    return (hasattr(search.study, "Records")
            and "records" in inspect.signature(search.study.run_trials).parameters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,4", help="comma-separated worker counts")
    parser.add_argument("--trial-seconds", type=float, default=2.0,
                        help="fixed cost of a trial (a sleep standing in for merge + scoring)")
    parser.add_argument("--duration", type=float, default=180.0,
                        help="seconds each run lasts (each worker's timeout)")
    parser.add_argument("--trials", type=int, default=None,
                        help="instead of --duration: run until the study holds this many "
                             "finished trials (the study's budget, MaxTrialsCallback)")
    parser.add_argument("--url", default=DEFAULT_URL, help="storage URL (PostgreSQL)")
    parser.add_argument("--fresh-db", action=argparse.BooleanOptionalAction, default=True,
                        help="run in a new database on --url's server, dropped at the end "
                             "(default); --no-fresh-db: in --url's database itself")
    parser.add_argument("--records", choices=("auto", "on", "off"), default="auto",
                        help="record each evaluation (mergesearch's tables and an items "
                             "artifact) as `mergesearch worker` does; auto: when this "
                             "checkout has them")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    duration = None if args.trials is not None else args.duration

    import optuna

    from search.spec import load_spec
    from storage.rdb import _shown

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(SPEC_PATH)
    print("# command: " + " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
          flush=True)
    print(f"# {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, optuna {optuna.__version__}, "
          f"{server_version(args.url)}, storage {_shown(args.url)}", flush=True)
    print(f"# demo spec: sampler {spec.sampler.name} (n_startup_trials "
          f"{spec.sampler.n_startup_trials}), heartbeat interval {spec.heartbeat.interval} s; "
          f"trial cost {args.trial_seconds:g} s (sleep); "
          + (f"{args.duration:g} s per run" if duration else f"{args.trials} trials per run"),
          flush=True)
    records = args.records == "on" or (args.records == "auto" and records_available())
    print(f"# records: {'each evaluation recorded (tables + items artifact)' if records else 'off'}"
          f"; database: {'a fresh one, dropped at the end' if args.fresh_db else 'as given'}",
          flush=True)
    runs = []
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database(args.url)) if args.fresh_db else args.url
        artifacts = (Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-art-")))
                     if records else None)
        for n in counts:
            print(f"# running {n} worker(s) ...", flush=True)
            result = run_once(url, n, args.trial_seconds, duration, args.trials, artifacts)
            runs.append(result)
            print(f"#   {result['finished']} finished in {result['wall']:.1f} s, states "
                  f"{ {k: v for k, v in result['by_state'].items() if v} }, load average "
                  f"{result['load'][0]:.2f} -> {result['load'][1]:.2f}", flush=True)

    base = next((r for r in runs if r["workers"] == 1), None)
    base_rate = base["finished"] / base["wall"] * 3600 if base else None
    print()
    print("| workers | finished trials (per worker) | wall | trials per hour | ideal "
          "| speed-up vs 1 | between trials, ms (median / p95) | checks |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        reps = r["reports"]
        rate = r["finished"] / r["wall"] * 3600
        ideal = 3600 * r["workers"] / args.trial_seconds
        gaps = [g for rep in reps for g in rep["gaps"]]
        speedup = (f"{rate / base_rate:.2f}x (ideal {r['workers']}.0)" if base_rate else "-")
        failed = [k for k, ok in r["checks"].items() if not ok]
        print(f"| {r['workers']} | {r['finished']} ({' + '.join(str(p['scored']) for p in reps)})"
              f" | {r['wall']:.0f} s | {rate:,.0f} | {ideal:,.0f} | {speedup} | "
              f"{_ms(gaps)} / {_ms(gaps, 0.95)} | "
              + ("all passed" if not failed else "FAILED: " + ", ".join(failed)) + " |")
    print()
    print("Time a trial spends besides its fixed cost, mean ms per finished trial, and the "
          "workers' CPU time per finished trial:")
    print()
    print("| workers | " + " | ".join(PARTS.values()) + " | other | total | CPU "
          "| ask p95 | duplicated parameter sets |")
    print("|---|" + "---|" * (len(PARTS) + 5))
    for r in runs:
        reps = r["reports"]
        n = max(1, sum(rep["scored"] for rep in reps))
        parts = {k: sum(sum(rep["timings"][k]) for rep in reps) / n for k in PARTS}
        total = sum(rep["wall"] - rep["slept"] for rep in reps) / n
        cpu = sum(rep["cpu"] for rep in reps) / n
        asks = [a for rep in reps for a in rep["timings"]["ask"]]
        print(f"| {r['workers']} | " + " | ".join(f"{v * 1000:.0f}" for v in parts.values())
              + f" | {(total - sum(parts.values())) * 1000:.0f} | {total * 1000:.0f} | "
              f"{cpu * 1000:.0f} | {_ms(asks, 0.95)} | {r['duplicate_params']} |")
    print()
    print("checks: " + "; ".join(f"{r['workers']} worker(s): " + ", ".join(
        f"{k} {'ok' if ok else 'FAILED'}" for k, ok in r["checks"].items()) for r in runs))
    if any(not all(r["checks"].values()) for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
