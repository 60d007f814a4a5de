"""Sample efficiency of the samplers, and what pruning saves, on the demo's problem.

The problem: the demo study (its two tiny parents, its probes, its dev split) with a
3-gene space: `merge.genes: anchors` with `merge.anchors: 2` and `merge.outer_genes: false`
gives t[anchor.0] and t[anchor.1] (first and last layer, linearly interpolated between) and
t[*] (embeddings, final norm, lm_head), and `combine: weighted` makes the two objectives
(clinical: ROUGE-L on radiology; instruction: IFEval prompt-level strict) one value, their
mean. (`merge.anchors: 3` with `outer_genes: false` gives four genes, three anchors and
`*`; pass --anchors 3 to search that space instead.) The demo spec's constraints are
dropped, and `evaluation.chunk_size` is --chunk-size (40 by default: the demo's value when
this was first measured; the probes are scored one after the other, radiology first, so with
40 the only pruning check sees the 40 radiology items). Every run goes through the real
pipeline: a spec written to --out, `search.run.launch_study` on a SQLite file, the HF engine
on the CPU, no test-split scoring.

1. Dense grid: `sampler: grid` with --grid-points G values per gene (G^genes trials plus
   the three baselines the study enqueues). Its best value is taken as the true optimum.
2. For each of --samplers and each of --seeds: --trials trials (the three baselines, each
   parent and their uniform average, are trials 1-3 and count). Reported: the number of
   trials after which the best value so far reaches the target, 95% of the optimum (as
   `optimum - 0.05 * |optimum|`, which is 0.95 x optimum when it is positive and still
   below it when it is not); the same for 99% and 100% of the grid optimum.
3. Pruning (`evaluation.pruning`, Optuna's Wilcoxon pruner on per-item values) on and off,
   same seed (the first of --seeds), with the random sampler (proposals independent of
   results: the script checks that both runs proposed the same parameters) and TPE: dev
   item evaluations (user attribute `items_evaluated`; where a trial lacks it, as without
   pruning in older versions, items per trial x finished trials), trials pruned, the saving,
   and whether the best trial and value are the same. The pruning-off runs are the
   sampler runs of step 2 with the same seed (identical specs), not run twice.

Runs whose results file (`<run>.json`) is already in --out are read back, not run again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from search.run import launch_study  # noqa: E402
from search.spec import load_spec  # noqa: E402
from search.workbench import build_suite  # noqa: E402

ASSETS = REPO / "search/demo/assets"
LEVELS = (0.95, 0.99, 1.0)


# ---------------------------------------------------------------- running one study


def write_spec(folder: Path, name: str, seed: int, sampler: str, args: argparse.Namespace,
               pruning: bool = False, n_trials: int | None = None) -> Path:
    """The demo spec, with absolute paths, the small space and one weighted objective."""
    data = yaml.safe_load((ASSETS / "spec.yaml").read_text(encoding="utf-8"))
    data["name"] = name
    data["seed"] = seed
    for parent in data["parents"]:
        parent["path"] = str((ASSETS / parent["path"]).resolve())
    for probe in data["probes"]:
        probe["path"] = str((ASSETS / probe["path"]).resolve())
    data["merge"].update(genes="anchors", anchors=args.anchors, outer_genes=False)
    data["combine"] = "weighted"  # objectives keep the default weight 1.0: equal shares
    data.pop("constraints", None)  # the problem is the plain weighted objective
    data["sampler"] = {"name": sampler, "n_startup_trials": args.startup,
                       "grid_points": args.grid_points}
    data["budget"] = {"n_trials": n_trials or args.trials}
    data["evaluation"]["test_top_k"] = 0
    data["evaluation"]["chunk_size"] = args.chunk_size
    data["evaluation"]["pruning"] = {"enabled": pruning, "p_threshold": args.p_threshold,
                                     "min_items": args.min_items}
    data["storage"] = f"sqlite:///{(folder / f'{name}.db').resolve()}"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_study(folder: Path, name: str, seed: int, sampler: str, args: argparse.Namespace,
              pruning: bool = False, n_trials: int | None = None) -> dict:
    """Run (or read back) one study; return its trials in number order."""
    result_path = folder / f"{name}.json"
    if result_path.exists():
        return json.loads(result_path.read_text(encoding="utf-8"))
    db = folder / f"{name}.db"
    if db.exists():  # an interrupted earlier run: start over, a resumed sampler differs
        db.unlink()
    spec_path = write_spec(folder, name, seed, sampler, args, pruning, n_trials)
    n = n_trials or args.trials
    print(f"  running {name}: {sampler}, seed {seed}, {n} trials, pruning "
          f"{'on' if pruning else 'off'}", file=sys.stderr, flush=True)
    began = time.perf_counter()
    launch_study(spec_path, storage=load_spec(spec_path).storage, name=name, n_trials=n,
                 test=False, progress=False)
    wall = time.perf_counter() - began
    study = optuna.load_study(study_name=name, storage=load_spec(spec_path).storage)
    trials = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else None)
        trials.append({"number": t.number, "state": t.state.name,
                       "value": t.value if t.state == optuna.trial.TrialState.COMPLETE
                       else None,
                       "params": t.params, "objectives": t.user_attrs.get("objectives"),
                       "items_evaluated": t.user_attrs.get("items_evaluated"),
                       "baseline": t.user_attrs.get("baseline"), "seconds": seconds})
    result = {"name": name, "sampler": sampler, "seed": seed, "pruning": pruning,
              "wall_s": wall, "trials": trials}
    result_path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"  {name}: {len(trials)} trials in {wall:.0f} s", file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------- measures


def complete(run: dict) -> list[dict]:
    return [t for t in run["trials"] if t["state"] == "COMPLETE"]


def best_trial(run: dict) -> dict:
    """Best complete trial; ties go to the lowest number, as the report ranks them."""
    return max(complete(run), key=lambda t: (t["value"], -t["number"]))


def target(optimum: float, level: float) -> float:
    return optimum - (1.0 - level) * abs(optimum)


def trials_to_reach(run: dict, goal: float) -> int | None:
    """Trials (counting every trial from the first, baselines included) until the best
    value so far is at least `goal`; None if never within the run."""
    for count, t in enumerate(run["trials"], start=1):
        if t["state"] == "COMPLETE" and t["value"] >= goal - 1e-12:
            return count
    return None


def median_count(counts: list[int | None], budget: int) -> str:
    values = [math.inf if c is None else c for c in counts]
    middle = statistics.median(values)
    if math.isinf(middle):
        return f"> {budget}"
    return f"{middle:g}"


def fmt_count(count: int | None, budget: int) -> str:
    return f"> {budget}" if count is None else str(count)


def items_evaluated(run: dict, items_per_trial: int) -> int:
    """Dev items scored over the run: the trial attribute where it was written (pruning on),
    else every finished trial scored all items."""
    total = 0
    for t in run["trials"]:
        if t["state"] not in ("COMPLETE", "PRUNED"):
            continue
        recorded = t["items_evaluated"]
        total += items_per_trial if recorded is None else recorded
    return total


def same_best(a: dict, b: dict) -> str:
    if a["value"] == b["value"]:
        return "yes" if a["number"] == b["number"] else "same value, other trial"
    return f"no ({a['value'] - b['value']:+.4f})"


def fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in params.items())


# ---------------------------------------------------------------- output


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "search", "merging", "evaluators", "storage", "mergesearch"],
                               capture_output=True, text=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = f"{REPO} (not a git checkout)"
    import torch
    return (f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, optuna {optuna.__version__}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), code at {commit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid-points", type=int, default=8, help="values per gene (G)")
    parser.add_argument("--seeds", default="0,1,2", help="spec seeds, comma-separated")
    parser.add_argument("--trials", type=int, default=40, help="trials per sampler run, "
                        "the three baselines included")
    parser.add_argument("--samplers", default="tpe,gp,cmaes,random")
    parser.add_argument("--pruning-samplers", default="random,tpe",
                        help="samplers compared with pruning on and off ('' for none)")
    parser.add_argument("--anchors", type=int, default=2,
                        help="merge.anchors (2: three genes with t[*]; 3: four genes)")
    parser.add_argument("--startup", type=int, default=10,
                        help="sampler.n_startup_trials (the demo spec's is 10)")
    parser.add_argument("--chunk-size", type=int, default=40,
                        help="evaluation.chunk_size: items between pruning checks (40: one "
                        "check, after the radiology items)")
    parser.add_argument("--p-threshold", type=float, default=0.1)
    parser.add_argument("--min-items", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for specs, studies and results (default: a temp dir)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="sample_efficiency_"))
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    samplers = [s for s in args.samplers.split(",") if s]
    pruning_samplers = [s for s in args.pruning_samplers.split(",") if s]
    started = time.perf_counter()
    print(f"results in {out}", file=sys.stderr, flush=True)

    spec = load_spec(write_spec(out, "probe", 0, "random", args))
    items_per_trial = sum(len(p.items("dev")) for p in build_suite(spec).probes.values())
    from merging import Parents
    from search.space import SearchSpace
    genes = [d.name for d in SearchSpace(
        spec, Parents({p.name: p.path for p in spec.parents}, "mmap").layout).dimensions]

    n_grid = args.grid_points ** len(genes)
    grid = run_study(out, f"grid{args.grid_points}", seeds[0], "grid", args,
                     n_trials=n_grid + 3)
    grid_best = best_trial(grid)
    optimum = grid_best["value"]

    runs: dict[tuple[str, int], dict] = {}
    for sampler in samplers:
        for seed in seeds:
            runs[sampler, seed] = run_study(out, f"{sampler}-s{seed}", seed, sampler, args)
    pruned_runs: dict[str, tuple[dict, dict]] = {}
    for sampler in pruning_samplers:
        off = runs.get((sampler, seeds[0])) or run_study(
            out, f"{sampler}-s{seeds[0]}", seeds[0], sampler, args)
        on = run_study(out, f"{sampler}-s{seeds[0]}-pruned", seeds[0], sampler, args,
                       pruning=True)
        pruned_runs[sampler] = off, on
    total = time.perf_counter() - started

    # ---- the problem and its optimum
    print(f"# machine: {machine()}")
    print(f"# command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# results and studies in {out}; this invocation took {total:.0f} s (runs read "
          "back from --out cost nothing)")
    print()
    print(f"Space: {len(genes)} genes ({', '.join(genes)}), linear merge, bounds [0, 1]; "
          f"study value = mean of clinical (radiology ROUGE-L) and instruction (IFEval "
          f"prompt-level strict) on the dev split, {items_per_trial} items per trial.")
    print()
    baselines = {t["baseline"]: t for t in complete(grid) if t["baseline"]}
    rows = [[f"grid optimum (G = {args.grid_points}, {n_grid} grid points + 3 baselines, "
             f"{len(grid['trials'])} trials, {grid['wall_s']:.0f} s)",
             str(grid_best["number"]), fmt_params(grid_best["params"]),
             f"{optimum:.4f}", *(f"{v:.4f}" for v in grid_best["objectives"].values())]]
    for name, t in baselines.items():
        rows.append([f"baseline {name}", str(t["number"]), fmt_params(t["params"]),
                     f"{t['value']:.4f} ({t['value'] / optimum:.1%})",
                     *(f"{v:.4f}" for v in t["objectives"].values())])
    values = sorted((t["value"] for t in complete(grid) if not t["baseline"]), reverse=True)
    print(table(["point", "trial", "params", "value (of optimum)",
                 *grid_best["objectives"]], rows))
    print()
    for level in LEVELS:
        share = sum(v >= target(optimum, level) - 1e-12 for v in values) / len(values)
        print(f"- grid points at or above {level:.0%} of the optimum "
              f"({target(optimum, level):.4f}): {share:.1%} of {len(values)}")
    print()

    # ---- trials to the target
    header = ["sampler", *[f"trials to {level:.0%}, by seed {','.join(map(str, seeds))}"
                           for level in LEVELS], "median to 95%",
              "best found / optimum, by seed", "wall s, by seed"]
    rows = []
    for sampler in samplers:
        cells = []
        for level in LEVELS:
            counts = [trials_to_reach(runs[sampler, s], target(optimum, level)) for s in seeds]
            cells.append(" / ".join(fmt_count(c, args.trials) for c in counts))
        counts95 = [trials_to_reach(runs[sampler, s], target(optimum, 0.95)) for s in seeds]
        cells.append(median_count(counts95, args.trials))
        cells.append(" / ".join(f"{best_trial(runs[sampler, s])['value'] / optimum:.1%}"
                                for s in seeds))
        cells.append(" / ".join(f"{runs[sampler, s]['wall_s']:.0f}" for s in seeds))
        rows.append([sampler, *cells])
    print(f"Trials needed ({args.trials} per run; the 3 baselines are trials 1-3 and count; "
          f"n_startup_trials {args.startup}; '> {args.trials}': not reached):")
    print()
    print(table(header, rows))
    print()

    # ---- pruning
    if pruned_runs:
        rows = []
        for sampler, (off, on) in pruned_runs.items():
            differ = [a["number"] for a, b in zip(off["trials"], on["trials"], strict=False)
                      if a["params"] != b["params"]]
            proposals = (f"differ from trial {differ[0]}" if differ else
                         "identical" if len(off["trials"]) == len(on["trials"]) else
                         "identical as far as the shorter run")
            for label, run in (("off", off), ("on", on)):
                items = items_evaluated(run, items_per_trial)
                full = items_evaluated(off, items_per_trial)
                best = best_trial(run)
                pruned = sum(t["state"] == "PRUNED" for t in run["trials"])
                rows.append([
                    sampler, label,
                    str(sum(t["state"] in ("COMPLETE", "PRUNED") for t in run["trials"])),
                    str(pruned), str(items),
                    "" if run is off else f"{1 - items / full:.1%}",
                    str(best["number"]), f"{best['value']:.4f}",
                    "" if run is off else same_best(best, best_trial(off)),
                    f"{run['wall_s']:.0f}",
                    "" if run is off else proposals,
                ])
        print(f"Pruning (Wilcoxon, p_threshold {args.p_threshold}, min_items "
              f"{args.min_items}, chunk_size {spec.evaluation.chunk_size}; seed {seeds[0]}; "
              f"{items_per_trial} dev items per full trial):")
        print()
        print(table(["sampler", "pruning", "finished trials", "pruned", "items evaluated",
                     "saved", "best trial", "best value", "same best", "wall s",
                     "proposals on vs off"], rows))
        print()
        for sampler, (off, on) in pruned_runs.items():
            by_number = {t["number"]: t for t in off["trials"]}
            for t in on["trials"]:
                if t["state"] == "PRUNED":
                    twin = by_number.get(t["number"])
                    full = (f"; unpruned it scored {twin['value']:.4f} "
                            f"({twin['value'] / optimum:.1%} of the optimum)"
                            if twin and twin["params"] == t["params"]
                            and twin["value"] is not None
                            else "")
                    print(f"- {sampler}: trial {t['number']} pruned after "
                          f"{t['items_evaluated']} items{full}")


if __name__ == "__main__":
    main()
