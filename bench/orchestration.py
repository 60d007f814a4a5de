"""Orchestration overhead per trial: sampler, storage and mergesearch's bookkeeping, with
no merging or scoring (a trial of zero cost), over a study of --trials trials.

The space is the demo spec's (its parents' layout, its genes); every trial does what a real
trial does around the merge and the suite: `SearchSpace.suggest`, the recipe, weights and
objective user attributes, and `tell` with two objective values (drawn from a fixed smooth
function of the parameters, so samplers have something to model). Per-trial time is reported
for windows of 50 trials, the last window being the cost at --trials trials; the target is
under 2% of a 60-second trial (1.2 s).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from merging import Parents  # noqa: E402
from search.space import SearchSpace  # noqa: E402
from search.spec import load_spec  # noqa: E402
from search.study import make_sampler  # noqa: E402
from storage import open_storage  # noqa: E402


def run(sampler_name: str, trials: int, storage_url: str, genes: str) -> list[float]:
    spec = load_spec(REPO / "search/demo/assets/spec.yaml")
    spec.sampler.name = sampler_name
    spec.merge.genes = genes
    layout = Parents({p.name: p.path for p in spec.parents}, "mmap").layout
    space = SearchSpace(spec, layout)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=open_storage(storage_url), sampler=make_sampler(spec, 0),
                                directions=spec.directions, study_name=sampler_name)
    times = []
    for number in range(trials):
        began = time.perf_counter()
        trial = study.ask()
        recipe = space.suggest(trial)
        trial.set_user_attr("recipe", recipe.to_dict())
        for key in ("weights_sha256", "weights_dtype", "weights_device"):
            trial.set_user_attr(key, "x" * 64)
        x = [trial.params[d.name] for d in space.dimensions]
        values = [sum(math.sin(3 * v + i) for i, v in enumerate(x)) / len(x),
                  sum(math.cos(2 * v - i) for i, v in enumerate(x)) / len(x)]
        trial.set_user_attr("objectives", dict(zip(["clinical", "instruction"], values,
                                                   strict=True)))
        study.tell(trial, values[: len(spec.directions)])
        times.append(time.perf_counter() - began)
        del number
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samplers", default="tpe,gp")
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--storage", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--genes", default="per_layer")
    args = parser.parse_args()
    rows = []
    for name in args.samplers.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            url = args.storage or f"sqlite:///{tmp}/bench.db"
            began = time.perf_counter()
            times = run(name, args.trials, url, args.genes)
            total = time.perf_counter() - began
        windows = [sum(times[i : i + 50]) / len(times[i : i + 50])
                   for i in range(0, len(times), 50)]
        last = windows[-1]
        rows.append([name, str(len(times)), f"{total:.0f} s",
                     " / ".join(f"{w * 1000:.0f}" for w in windows), f"{last * 1000:.0f} ms",
                     f"{last / 60:.2%}", "met" if last < 1.2 else "missed"])
    print(f"# {platform.machine()}, Python {platform.python_version()}, optuna "
          f"{optuna.__version__}, genes {args.genes}, storage "
          f"{args.storage or 'SQLite file'}")
    print("| sampler | trials | total | ms per trial, by 50-trial window | at the end | "
          "of a 60 s trial | < 2% |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
