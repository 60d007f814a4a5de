"""The vLLM engine on vLLM's CPU build against the HF engine, side by side, on one machine.

On two model pairs, the demo's tiny Llamas (search/demo/assets/models) and a random
150M-parameter Llama (`150m` in bench/gpu/models.py: hidden 768, 16 layers, 12 heads, MLP
3072, the demo's tokenizer; a bf16 base and two noisy fine-tunes made in a temp dir), it
measures for each engine (HF in float32, its CPU default; vLLM in bfloat16, its CPU fast
path, compiled unless --eager; vLLM in float32 too, for a like-for-like row):
  start      the engine's constructor (vLLM: its `timings["start"]`);
  parents    reading the parents (HF: `Parents(folders)`; vLLM: `timings["parents"]`);
  swap       `load_recipe(recipe).hexdigest()` for linear, ties and dare_ties, the median of
             --swaps after a warm-up (each swap a slightly different recipe), and linear
             once more without waiting for the weights hash (vLLM: hash_weights=False; HF:
             before `hexdigest()`), against the copy floor: one `copy_` of the model's
             parameter bytes in the engine's dtype (median of 9, measured before the
             engine starts, with no engine process beside it);
  generate   --prompts radiology probe prompts (the demo spec's template, chat-formatted,
             greedy, 32 new tokens; HF in batches of 16), after a warm-up of 4: prompts/s
             and generated tokens/s (the outputs re-tokenized);
  loglik     --prompts (findings, impression) log-likelihood requests: requests/s.
Then, once, the demo study end to end: `mergesearch launch` in a subprocess on a copy of the
demo's spec and assets with --trials trials, engine hf (the spec's own) against engine
{kind: vllm}, wall time with interpreter, imports and engine start included, and where it
goes (the trials' own times read back from the study's storage, and from how many trials on
vLLM would be 2x faster at the rates measured).
Targets: vLLM generation at least 10x the HF engine's (tokens/s) on the 150M model; the
linear swap within 3x of the copy floor; the demo study at least 2x faster with vLLM.

    .venv/bin/python bench/vllm_cpu.py --quick     # smoke run, about 5 minutes: the `15m`
                                                   # stand-in, 24 prompts, 2 swaps, 4 trials
    .venv/bin/python bench/vllm_cpu.py --append    # full run, the tables appended to
                                                   # docs/benchmarks.md

Run it on a quiet machine: the HF engine's torch threads take every core, and on a 2-core
VM another process makes its multi-threaded kernels (TIES's top-k above all) many times
slower; the report gives the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.gpu.models import generation_speed, make_parents  # noqa: E402
from bench.merge_speed import timed  # noqa: E402
from evaluators.engines import GenerationRequest, HFEngine, LoglikelihoodRequest  # noqa: E402
from evaluators.engines.vllm_engine import (  # noqa: E402
    VLLMEngine,
    VLLMOptions,
    vllm_build,
    vllm_missing,
)
from merging import Materializer, MergeRecipe, Parents  # noqa: E402
from merging.parents import safetensors_files  # noqa: E402

DEMO = REPO / "search/demo/assets"
TEMPLATE = "Summarize the radiology findings into a short impression.\nFindings: {}"
METHODS = ("linear", "ties", "dare_ties")
NEW_TOKENS, HF_BATCH, WARM_UP = 32, 16, 4


@dataclass
class EngineRun:
    """One engine's figures on one model pair."""

    label: str
    dtype: torch.dtype
    mode: str = "eager (transformers)"  # how the model runs
    start: float = 0.0  # HF: the constructor; vLLM: its timings["start"], LLM() alone
    constructor: float = 0.0  # the whole constructor (vLLM: parents and memory plan too)
    parents: float = 0.0
    floor: float = 0.0  # seconds to copy the model's bytes once in the engine's dtype
    swaps: dict[str, float] = field(default_factory=dict)
    swap_unhashed: float = 0.0  # linear, until the weights are in place (no hash wait)
    prompts_s: float = 0.0
    tokens_s: float = 0.0
    loglik_s: float = 0.0


def recipe(method: str, w: float) -> MergeRecipe:
    """The merge of clinical and instruct by `method` (ties, dare_ties: onto base)."""
    if method == "linear":
        return MergeRecipe("linear", ("clinical", "instruct"),
                           {"clinical": {"weight": w}, "instruct": {"weight": 1.0 - w}})
    return MergeRecipe(method, ("clinical", "instruct"),
                       {"clinical": {"weight": w, "density": 0.5},
                        "instruct": {"weight": 1.0 - w, "density": 0.7}}, base="base", seed=3)


def probe_requests(n: int) -> tuple[list[GenerationRequest], list[LoglikelihoodRequest]]:
    """n generation and n log-likelihood requests from the demo's radiology probe (its rows
    repeated past the end)."""
    lines = (DEMO / "probes/radiology.jsonl").read_text().splitlines()
    rows = [json.loads(lines[i % len(lines)]) for i in range(n)]
    return ([GenerationRequest(TEMPLATE.format(r["findings"]), max_new_tokens=NEW_TOKENS)
             for r in rows],
            [LoglikelihoodRequest(r["findings"], " " + r["impression"]) for r in rows])


def param_count(folder: Path) -> int:
    count = 0
    for path in safetensors_files(folder):
        with safe_open(path, "pt") as f:
            count += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return count


def copy_floor(params: int, dtype: torch.dtype, repeats: int = 9) -> float:
    """Median seconds of one in-memory copy of `params` values of `dtype`."""
    src = torch.ones(params, dtype=dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    return statistics.median(timed(lambda: dst.copy_(src)) for _ in range(repeats))


def swap_time(engine, method: str, repeats: int, hashed: bool = True) -> float:
    """Median seconds of a swap after a warm-up, each a new weight: load_recipe until
    hexdigest() returns, or (not `hashed`) until the weights are in place: vLLM's
    load_recipe(hash_weights=False); HF's load_recipe, whose hash goes on in background
    threads (waited for after the timing)."""
    seconds = []
    for i in range(repeats + 1):
        r = recipe(method, 0.3 + 0.05 * i)
        if hashed:
            seconds.append(timed(lambda r=r: engine.load_recipe(r).hexdigest()))
        elif isinstance(engine, VLLMEngine):
            seconds.append(timed(lambda r=r: engine.load_recipe(r, hash_weights=False)))
        else:
            pending = []
            seconds.append(timed(lambda r=r, p=pending: p.append(engine.load_recipe(r))))
            pending[0].hexdigest()
    return statistics.median(seconds[1:])


def measure(engine, run: EngineRun, args, requests) -> EngineRun:
    """Swaps, generation and log-likelihoods on a started engine."""
    generation, loglik = requests
    for method in METHODS:
        run.swaps[method] = swap_time(engine, method, args.swaps)
        print(f"  {run.label} swap {method}: {run.swaps[method] * 1e3:.0f} ms", flush=True)
    run.swap_unhashed = swap_time(engine, "linear", args.swaps, hashed=False)
    engine.generate(generation[:WARM_UP])
    run.prompts_s, run.tokens_s = generation_speed(engine, generation, "cpu")
    engine.loglikelihood(loglik[:WARM_UP])
    run.loglik_s = len(loglik) / timed(lambda: engine.loglikelihood(loglik))
    print(f"  {run.label}: {run.tokens_s:.0f} tokens/s, {run.loglik_s:.1f} loglik/s",
          flush=True)
    return run


def run_hf(folders: dict[str, Path], params: int, args, requests) -> EngineRun:
    torch.set_num_threads(args.threads)  # vLLM's start may have lowered them here
    run = EngineRun("HF fp32", torch.float32, floor=copy_floor(params, torch.float32))
    parents: list[Parents] = []
    run.parents = timed(lambda: parents.append(Parents(folders)))
    engine: list[HFEngine] = []
    run.start = run.constructor = timed(lambda: engine.append(HFEngine(
        folders["instruct"], device="cpu", dtype="float32", batch_size=HF_BATCH,
        materializer=Materializer(parents[0]))))
    print(f"  HF: start {run.start:.1f} s, parents {run.parents:.1f} s", flush=True)
    try:
        return measure(engine[0], run, args, requests)
    finally:
        engine[0].close()


def compilation(engine: VLLMEngine) -> str:
    """How vLLM runs the model: eager, or compiled with its mode and backend (on the CPU:
    dynamo traced once, inductor)."""
    config = engine.llm.llm_engine.vllm_config.compilation_config
    if engine.options.enforce_eager or config.mode == 0:
        return "eager"
    return f"compiled ({getattr(config.mode, 'name', config.mode)}, {config.backend})"


def run_vllm(folders: dict[str, Path], dtype: str, params: int, args, requests) -> EngineRun:
    floor = copy_floor(params, getattr(torch, dtype))  # before vLLM's processes start
    options = VLLMOptions(dtype=dtype, enforce_eager=args.eager, seed=0)
    engine: list[VLLMEngine] = []
    constructor = timed(lambda: engine.append(VLLMEngine(folders["instruct"], options,
                                                         parents=folders)))
    timings = engine[0].timings
    run = EngineRun(f"vLLM {'bf16' if dtype == 'bfloat16' else 'fp32'}", getattr(torch, dtype),
                    mode=compilation(engine[0]), start=timings["start"],
                    constructor=constructor, parents=timings["parents"], floor=floor)
    print(f"  {run.label}: start {run.start:.1f} s, parents {run.parents:.2f} s, "
          f"{run.mode} ({engine[0].plan.summary()})", flush=True)
    try:
        return measure(engine[0], run, args, requests)
    finally:
        engine[0].close()


def pair_table(name: str, params: int, runs: list[EngineRun]) -> list[str]:
    """One markdown table: a row per measure, a column per engine, and vLLM/HF."""
    hf, first = runs[0], runs[1] if len(runs) > 1 else None

    def ms(x: float) -> str:
        return f"{x * 1e3:.0f}" if x >= 0.01 else f"{x * 1e3:.2f}"

    rows = [("runs", [r.mode for r in runs], None),
            ("engine start (s)", [f"{r.start:.1f}" for r in runs], None),
            ("whole constructor (s)", [f"{r.constructor:.1f}" for r in runs], None),
            ("parent load (s)", [f"{r.parents:.2f}" for r in runs], None),
            ("copy floor (ms)", [ms(r.floor) for r in runs], None)]
    for method in METHODS:
        rows.append((f"swap {method} (ms, x floor)",
                     [f"{ms(r.swaps[method])} ({r.swaps[method] / r.floor:.1f}x)" for r in runs],
                     hf.swaps[method] / first.swaps[method] if first else None))
    rows.append(("swap linear, no hash wait (ms, x floor)",
                 [f"{ms(r.swap_unhashed)} ({r.swap_unhashed / r.floor:.1f}x)" for r in runs],
                 hf.swap_unhashed / first.swap_unhashed if first else None))
    rows += [("generate (prompts/s)", [f"{r.prompts_s:.2f}" for r in runs],
              first.prompts_s / hf.prompts_s if first else None),
             ("generate (tokens/s)", [f"{r.tokens_s:.0f}" for r in runs],
              first.tokens_s / hf.tokens_s if first else None),
             ("log-likelihood (requests/s)", [f"{r.loglik_s:.1f}" for r in runs],
              first.loglik_s / hf.loglik_s if first else None)]
    lines = [f"**{name}** ({params / 1e6:.1f}M parameters)", "",
             "| measure | " + " | ".join(r.label for r in runs)
             + f" | {first.label if first else 'vLLM'} over HF |",
             "|---" * (len(runs) + 2) + "|"]
    for label, cells, ratio in rows:
        lines.append(f"| {label} | " + " | ".join(cells) + " | "
                     + (f"{ratio:.1f}x" if ratio else "") + " |")
    return lines


# ------------------------------------------------------------------ the demo study


@dataclass
class StudyRun:
    engine: str
    wall: float
    first_trial: float  # from launch until the first trial starts
    trials: float  # first trial's start to the last one's end
    complete: int
    pruned: int
    engine_start: float | None  # vLLM's, from its log line


def demo_study(kind: str, trials: int, root: Path, eager: bool) -> StudyRun:
    """`mergesearch launch` on a copy of the demo's spec and assets, engine `kind`."""
    folder = root / f"study-{kind}"
    subprocess.run(["cp", "-r", str(DEMO), str(folder)], check=True)
    spec = yaml.safe_load((folder / "spec.yaml").read_text())
    if kind == "vllm":
        spec["engine"] = {"kind": "vllm", "enforce_eager": eager}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    command = [sys.executable, "-m", "search.cli", "launch", "spec.yaml",
               "--n-trials", str(trials)]
    began, began_clock = time.perf_counter(), time.time()
    log = folder / "launch.log"
    with open(log, "w") as out:
        proc = subprocess.run(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - began
    text = log.read_text()
    if proc.returncode:
        sys.exit(f"the {kind} study failed ({proc.returncode}); the end of {log}:\n"
                 + text[-3000:])
    started = re.search(r"started vLLM \(\w+\) in ([\d.]+) s", text)
    return study_figures(kind, folder / "study.db", wall, began_clock,
                         float(started.group(1)) if started else None)


def study_figures(kind: str, db: Path, wall: float, began: float,
                  engine_start: float | None) -> StudyRun:
    """Trial counts and times from the study's storage."""
    import optuna

    from storage import open_storage

    study = optuna.load_study(study_name="demo",
                              storage=open_storage(f"sqlite:///{db}", create=False))
    finished = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    first = min(t.datetime_start for t in finished).timestamp()
    last = max(t.datetime_complete for t in finished).timestamp()
    states = [t.state.name for t in finished]
    return StudyRun(kind, wall, first - began, last - first, states.count("COMPLETE"),
                    states.count("PRUNED"), engine_start)


def study_table(runs: list[StudyRun], trials: int) -> list[str]:
    hf, vllm = runs
    lines = [f"**The demo study end to end** (`mergesearch launch`, --n-trials {trials}, "
             "2 of them the parents' baselines; then the test split for the baselines and "
             "top 3)", "",
             "| engine | trials complete / pruned | wall (s) | launch to first trial (s) | "
             "of which vLLM start (s) | trials (s, per trial) | test split + close (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        n = r.complete + r.pruned
        rest = r.wall - r.first_trial - r.trials
        start = f"{r.engine_start:.1f}" if r.engine_start is not None else "-"
        lines.append(f"| {r.engine} | {r.complete} / {r.pruned} | {r.wall:.0f} | "
                     f"{r.first_trial:.1f} | {start} | {r.trials:.1f} ({r.trials / n:.1f}) | "
                     f"{rest:.1f} |")
    lines.append(f"| HF / vLLM | | {hf.wall / vllm.wall:.2f}x | | | "
                 f"{hf.trials / vllm.trials:.2f}x | |")
    return lines + ["", break_even(hf, vllm)]


def break_even(hf: StudyRun, vllm: StudyRun) -> str:
    """Where the time goes, and from how many trials on vLLM would be 2x faster."""
    fixed = {r.engine: r.wall - r.trials for r in (hf, vllm)}
    per = {r.engine: r.trials / (r.complete + r.pruned) for r in (hf, vllm)}
    start = (f"{vllm.engine_start:.0f} s of it vLLM's start" if vllm.engine_start is not None
             else "vLLM's start not found in its log")
    line = (f"Outside its trials the HF study took {fixed['hf']:.0f} s and the vLLM one "
            f"{fixed['vllm']:.0f} s ({start}); a trial took {per['hf']:.1f} s against "
            f"{per['vllm']:.1f} s. ")
    if per["hf"] <= 2 * per["vllm"]:
        return line + "At these rates vLLM is never 2x faster end to end."
    trials = (2 * fixed["vllm"] - fixed["hf"]) / (per["hf"] - 2 * per["vllm"])
    return line + (f"At these rates the vLLM study is 2x faster end to end from about "
                   f"{max(math.ceil(trials), 1)} trials on (the demo spec's budget is 30).")


# ------------------------------------------------------------------ report


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {ram:.0f} GiB RAM"


def targets(pairs: dict, study: list[StudyRun] | None) -> list[str]:
    """The three targets, on the larger pair's first vLLM engine (bf16 by default)."""
    shape = list(pairs)[-1]
    hf, vllm = pairs[shape][1][:2]
    gen = vllm.tokens_s / hf.tokens_s
    swap, unhashed = vllm.swaps["linear"] / vllm.floor, vllm.swap_unhashed / vllm.floor
    rows = [(f"vLLM generation at least 10x the HF engine's (tokens/s, `{shape}`)",
             f"{gen:.1f}x", gen >= 10),
            (f"linear swap within 3x of the copy floor ({vllm.label}, `{shape}`)",
             f"{swap:.1f}x ({unhashed:.1f}x with no hash wait)", swap <= 3)]
    if study:
        speed = study[0].wall / study[1].wall
        rows.append(("demo study at least 2x faster end to end with vLLM",
                     f"{speed:.2f}x", speed >= 2))
    return (["| target | measured | result |", "|---|---|---|"]
            + [f"| {what} | {value} | {'met' if ok else 'not met'} |"
               for what, value, ok in rows])


def import_seconds() -> float:
    """A fresh interpreter's `import vllm`: each vLLM start pays it twice over (its engine
    core and its worker are new processes)."""
    return timed(lambda: subprocess.run([sys.executable, "-c", "import vllm"], check=True,
                                        capture_output=True))


def vllm_version() -> str:
    for distribution in ("vllm-cpu", "vllm"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return "?"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 15m stand-in, 24 prompts, 2 swaps, 4 trials, "
                        "no vLLM float32")
    parser.add_argument("--shape", default=None, help="the larger pair (default 150m)")
    parser.add_argument("--prompts", type=int, default=None, help="default 100")
    parser.add_argument("--swaps", type=int, default=None, help="default 5")
    parser.add_argument("--trials", type=int, default=None, help="study trials, default 10")
    parser.add_argument("--vllm-dtypes", default=None, help="default bfloat16,float32")
    parser.add_argument("--eager", action="store_true", help="vLLM with enforce_eager")
    parser.add_argument("--no-study", action="store_true")
    parser.add_argument("--append", action="store_true",
                        help="append the tables to docs/benchmarks.md")
    args = parser.parse_args()
    quick = args.quick
    args.shape = args.shape or ("15m" if quick else "150m")
    args.prompts = args.prompts or (24 if quick else 100)
    args.swaps = args.swaps or (2 if quick else 5)
    args.trials = args.trials or (4 if quick else 10)
    args.vllm_dtypes = (args.vllm_dtypes or ("bfloat16" if quick else "bfloat16,float32")
                        ).split(",")
    args.threads = torch.get_num_threads()
    return args


def report(args, pairs: dict, study: list[StudyRun] | None, notes: dict) -> str:
    """The markdown block: a heading naming the machine, the date and the command, then the
    tables."""
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    lines = [f"## vLLM's CPU build against the HF engine (bench/vllm_cpu.py): {machine()}, "
             f"{datetime.date.today()}", "",
             f"Command: `{command}` (whole run {notes['seconds']:.0f} s; 1-minute load "
             f"average {notes['load'][0]:.1f} before, {notes['load'][1]:.1f} after).",
             f"torch {torch.__version__}, HF engine on {args.threads} threads; vLLM "
             f"{vllm_version()} (CPU build), which keeps one core for its scheduler and runs "
             f"its worker on the other {os.cpu_count() - 1}; a fresh `import vllm` takes "
             f"{notes['import']:.1f} s, and each vLLM start spawns two processes that import "
             f"it. {args.prompts} prompts of the demo's radiology probe, {NEW_TOKENS} new "
             f"tokens, HF batch {HF_BATCH}; swaps: median of {args.swaps} after a warm-up; the "
             "same last recipe (linear) is loaded in every engine when generating.", ""]
    for name, (params, runs) in pairs.items():
        label = "Demo models (search/demo/assets/models)" if name == "demo" else \
            f"Random Llama `{name}` (bench/gpu/models.py), bf16 on disk, the demo's tokenizer"
        lines += pair_table(label, params, runs) + [""]
    if study:
        lines += study_table(study, args.trials) + [""]
    return "\n".join(lines + targets(pairs, study))


def main() -> None:
    args = parse_args()
    if vllm_build() != "cpu":
        sys.exit(f"{Path(__file__).name} measures vLLM's CPU build: "
                 + ("; ".join(vllm_missing()) or "the installed vLLM is the CUDA build (on a "
                    "GPU, bench/gpu/vllm_swap.py)"))
    run_start, load_before = time.perf_counter(), os.getloadavg()[0]
    notes = {"import": import_seconds()}
    requests = probe_requests(args.prompts)
    with tempfile.TemporaryDirectory(prefix="vllm_cpu_") as tmp:
        root = Path(tmp)
        demo_tokenizer = AutoTokenizer.from_pretrained(DEMO / "models/instruct")
        folders = {"demo": {n: DEMO / "models" / n for n in ("base", "clinical", "instruct")},
                   args.shape: make_parents(root / "models", args.shape,
                                            tokenizer=demo_tokenizer)}
        pairs = {}
        for name, pair in folders.items():
            params = param_count(pair["instruct"])
            print(f"{name}: {params:,} parameters", flush=True)
            runs = [run_hf(pair, params, args, requests)]
            runs += [run_vllm(pair, dtype, params, args, requests) for dtype in args.vllm_dtypes]
            pairs[name] = (params, runs)
        study = None if args.no_study else [
            demo_study(kind, args.trials, root, args.eager) for kind in ("hf", "vllm")]
    notes |= {"seconds": time.perf_counter() - run_start,
              "load": (load_before, os.getloadavg()[0])}
    block = report(args, pairs, study, notes)
    print("\n" + block)
    if args.append:
        with open(REPO / "docs" / "benchmarks.md", "a") as f:
            f.write("\n" + block + "\n")


if __name__ == "__main__":
    main()
