"""Workers on one study: trials per hour with N workers against one, on a workload of fixed
trial cost, over a PostgreSQL store.

Each worker is its own OS process (multiprocessing, spawn) that joins the study the way
`mergesearch worker` does: `load_study(url, name, as_worker=True)` (the stored spec's sampler,
TPE multivariate with constant liar, seeded by `worker_seed`; `open_storage` with the spec's
heartbeat), then `run_trials`, which runs the project's own objective (`make_objective`:
`SearchSpace.suggest`, the recipe, weights and objective user attributes, `tell`), with
`MaxTrialsCallback` and the stop-after-failures callback. The study is created and its
baselines enqueued as `mergesearch launch` does (`create_or_resume`, `enqueue_baselines`).

Only the merge and the scoring are replaced: the workbench's `score` is `time.sleep(T)`,
standing in for merge + evaluation on a GPU, so the trial cost is the same with 1 and with 4
workers whatever the CPU (a CPU-bound stand-in on a 2-core machine would measure core
contention, not the study's machinery). Its two objective values come from a fixed smooth
function of the parameters (as in bench/orchestration.py), so TPE has something to model.

Workers wait on a common start, run for --duration seconds each (Optuna's timeout: a worker
starts no trial after it, and finishes the one in flight), then the study is checked: every
trial number unique, no trial handed to two workers, the finished count equal to the sum of
the workers' own counts, nothing left RUNNING or WAITING, each baseline run once. The studies
made here are deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
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
         "tell": "tell", "budget": "budget callback", "stale": "stale-trial check"}
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
    fixed cost: `time.sleep(seconds)`."""

    def __init__(self, spec, seconds: float):
        from merging import Parents
        from search.space import SearchSpace

        self.spec, self.seconds = spec, seconds
        layout = Parents({p.name: p.path for p in spec.parents}, "mmap").layout
        self.space = _RecordingSpace(SearchSpace(spec, layout), self)
        self.warm_starts: dict[str, dict[str, float]] = {}
        self.last_params: list[float] = []
        self.sleeps: list[tuple[float, float]] = []  # perf_counter at start and end

    def score(self, recipe, split, on_items=None):
        from evaluators.suite import SuiteResult

        began = time.perf_counter()
        time.sleep(self.seconds)
        self.sleeps.append((began, time.perf_counter()))
        x = self.last_params or [0.5]
        values = [sum(math.sin(3 * v + i) for i, v in enumerate(x)) / len(x),
                  sum(math.cos(2 * v - i) for i, v in enumerate(x)) / len(x)]
        names = [o.name for o in self.spec.objectives]
        objectives = dict(zip(names, values, strict=True))
        probes = {p: {o.metric or "score": objectives[o.name] for o in self.spec.objectives
                      if p in o.probes} for p in {p for o in self.spec.objectives
                                                  for p in o.probes}}
        digest = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()
        return digest, SuiteResult(items=[], probes=probes, objectives=objectives)

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
                n_trials: int | None, ready, go, start_at, results) -> None:
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
        ready.put(os.getpid())
        go.wait()
        while time.time() < start_at.value:
            time.sleep(0.001)
        began, cpu0 = time.perf_counter(), time.process_time()
        run_trials(study, bench, n_trials if n_trials is not None else BUDGET_UNLIMITED,
                   duration, progress=False)
        ended, cpu = time.perf_counter(), time.process_time() - cpu0
        sleeps = bench.sleeps
        gaps = [sleeps[i + 1][0] - sleeps[i][1] for i in range(len(sleeps) - 1)]
        results.put({"pid": os.getpid(), "seed": worker_seed(bench.spec.seed),
                     "trial_ids": trial_ids, "scored": len(sleeps), "timings": timings,
                     "gaps": gaps,
                     "slept": sum(b - a for a, b in sleeps), "wall": ended - began,
                     "cpu": cpu, "end_wall": time.time(), "error": None})
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put({"pid": os.getpid(), "error": traceback.format_exc()})


# ---------------------------------------------------------------- one run of N workers


def run_once(url: str, workers: int, seconds: float, duration: float | None,
             n_trials: int | None) -> dict:
    import optuna
    from optuna.trial import TrialState

    from search.spec import load_spec
    from search.study import BASELINE_ATTR, create_or_resume, enqueue_baselines
    from storage import open_storage

    spec = load_spec(SPEC_PATH)
    name = f"bench-workers-{workers}w-{uuid.uuid4().hex[:8]}"
    study = create_or_resume(spec, url, name)
    bench = FixedCostBench(spec, seconds)
    enqueue_baselines(study, bench)
    n_baselines = len(bench.space.baselines())
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=worker_main, args=(url, name, seconds, duration, n_trials,
                                                    ready, go, start_at, results))
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
        duplicate_params = len(params) - len(set(params))
        storage.engine.dispose()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        try:
            optuna.delete_study(study_name=name, storage=open_storage(url))
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
    runs = []
    for n in counts:
        print(f"# running {n} worker(s) ...", flush=True)
        result = run_once(args.url, n, args.trial_seconds, duration, args.trials)
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
