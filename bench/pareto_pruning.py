"""Item-level early stop in a Pareto study: item evaluations saved, and the front kept.

The demo study (two objectives, per-layer genes, without its constraint) runs twice with
the random sampler and the same seed, once without pruning and once with the Pareto early
stop (search/item_pruning.py).
The random sampler's proposals do not depend on results, so trial N is the same merge in
both runs (checked): a trial stopped in the pruned run was fully scored in the other, and
the front is kept when no stopped trial is on the unpruned run's front.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from search.run import launch_study  # noqa: E402

ASSETS = REPO / "search/demo/assets"


def run(out: Path, pruning: bool, args: argparse.Namespace) -> tuple[optuna.Study, float]:
    spec = yaml.safe_load((ASSETS / "spec.yaml").read_text())
    for entry in spec["parents"] + spec["probes"]:
        entry["path"] = str(ASSETS / entry["path"])
    spec["sampler"] = {"name": "random"}
    spec.pop("constraints", None)  # the whole front, not its feasible part
    spec["seed"] = args.seed
    spec["evaluation"] = {"chunk_size": args.chunk_size, "test_top_k": 0, "pruning": {
        "enabled": pruning, "p_threshold": args.p_threshold, "min_items": args.min_items,
        "margin": args.margin}}
    out.mkdir(parents=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec))
    began = time.perf_counter()
    launch_study(out / "spec.yaml", n_trials=args.trials, test=False, progress=False)
    seconds = time.perf_counter() - began
    return optuna.load_study(study_name="demo", storage=f"sqlite:///{out / 'study.db'}"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p-threshold", type=float, default=0.1)
    parser.add_argument("--min-items", type=int, default=16)
    parser.add_argument("--margin", type=float, default=0.02)
    parser.add_argument("--chunk-size", type=int, default=16)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="pareto-pruning-"))
    try:
        full, full_s = run(root / "off", False, args)
        pruned, pruned_s = run(root / "on", True, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    same = all(a.params == b.params for a, b in zip(full.trials, pruned.trials, strict=False))
    stopped = [t for t in pruned.trials if t.state == optuna.trial.TrialState.PRUNED]
    front_full = sorted(t.number for t in full.best_trials)
    front_pruned = sorted(t.number for t in pruned.best_trials)
    items_full = sum(t.user_attrs.get("items_evaluated", 0) for t in full.trials)
    items_pruned = sum(t.user_attrs.get("items_evaluated", 0) for t in pruned.trials)
    lost = sorted({t.number for t in stopped} & set(front_full))
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, Optuna {optuna.__version__}")
    print("command: " + " ".join(["python", *sys.argv]))
    print(f"same proposals in both runs: {same}\n")
    print("| run | trials | stopped early | item evaluations | wall | Pareto front (trials) |")
    print("|---|---|---|---|---|---|")
    print(f"| no pruning | {len(full.trials)} | 0 | {items_full} | {full_s:.0f} s | "
          f"{front_full} |")
    print(f"| Pareto early stop (p {args.p_threshold}, margin {args.margin}) | "
          f"{len(pruned.trials)} | {len(stopped)} | "
          f"{items_pruned} ({100 * (1 - items_pruned / items_full):.1f}% saved) | "
          f"{pruned_s:.0f} s | {front_pruned} |")
    print("\nstopped: " + ", ".join(
        f"{t.number} after {t.user_attrs['items_evaluated']} items (by trial "
        f"{t.user_attrs.get('pruned_by')})" for t in stopped))
    print(f"stopped trials on the unpruned front: {lost or 'none'}; "
          f"fronts identical: {front_full == front_pruned}")


if __name__ == "__main__":
    main()
