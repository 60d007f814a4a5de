"""Merger speed: in-memory materialisation per trial vs. the memory floor and vs. mergekit.

On a random bf16 Llama (`--shape 1b`: 1.10B parameters) it measures, in one run:
  (a) `Materializer(parents).write_into(model, recipe)` per trial for linear, slerp and ties
      (median of --repeats after a warm-up; a method not in METHODS is skipped);
  (b) the floor: the bytes a trial must move (each parent the recipe uses read once in its
      stored dtype, plus the target written once) over the copy bandwidth of the same run
      (`dst.copy_(src)` on 1 GiB, 2*bytes/time, best of 10 before and 10 after the trials;
      on a shared 2-vCPU VM it swings between ~45 and ~75 GB/s with the host's load);
  (c) `mergekit-yaml CONFIG OUT` on the same merge, as subprocess wall time: what a user of
      mergekit-evolve's on-disk mode pays per candidate (CPU mode only).
Targets: linear within 2x of the floor; in-memory per trial at least 20x faster than
mergekit's per-candidate merge; on GPU, linear within 3x of the HBM floor.
CPU parents are HF folders made once under --models-dir; with `--device cuda` (shape 8b) or
--from-tensors they are made in place, no disk, and passed to `Parents.from_tensors`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from merging import Materializer, MergeRecipe, Parents  # noqa: E402
from merging.methods import METHODS  # noqa: E402

# (hidden, intermediate, layers, vocab), all with 32 heads, 8 kv heads, untied embeddings.
SHAPES = {"tiny": (256, 512, 2, 1000), "1b": (2048, 8192, 16, 32000),  # tiny: a smoke test
          "8b": (4096, 14336, 32, 128256)}  # Llama-3.1-8B
RECIPES = {
    "linear": MergeRecipe(method="linear", models=("a", "b"),
                          model_params={"a": {"weight": 0.4}, "b": {"weight": 0.6}}),
    "slerp": MergeRecipe(method="slerp", models=("b",), base="a", params={"t": 0.4}),
    "ties": MergeRecipe(method="ties", models=("a", "b"), base="base",
                        model_params={"a": {"weight": 0.5, "density": 0.5},
                                      "b": {"weight": 0.5, "density": 0.5}}),
}
USES = {m: {*r.models, *([r.base] if r.base else [])} for m, r in RECIPES.items()}  # parents


def mergekit_config(method: str, paths: dict[str, Path]) -> dict:
    """The mergekit YAML for the same merge as RECIPES[method]."""
    p = {name: str(path) for name, path in paths.items()}
    if method == "linear":
        return {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": p["a"], "parameters": {"weight": 0.4}},
            {"model": p["b"], "parameters": {"weight": 0.6}}]}
    if method == "slerp":
        return {"merge_method": "slerp", "dtype": "bfloat16", "base_model": p["a"],
                "parameters": {"t": 0.4}, "models": [{"model": p["a"]}, {"model": p["b"]}]}
    return {"merge_method": "ties", "dtype": "bfloat16", "base_model": p["base"], "models": [
        {"model": p[m], "parameters": {"weight": 0.5, "density": 0.5}} for m in "ab"]}


def empty_model(config: LlamaConfig, device: str) -> LlamaForCausalLM:
    """A bf16 Llama with uninitialised storage (built on meta, so nothing is filled twice)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).to_empty(device=device).eval()


def random_state(shapes: dict, device: str, seed: int, base: dict | None = None,
                 std: float = 0.02) -> dict:
    """Seeded bf16 weights: a 'base' (N(0, std), norms 1) or `base` + N(0, std / 10) noise."""
    gen = torch.Generator(device).manual_seed(seed)
    out = {name: torch.empty(shape, dtype=torch.bfloat16, device=device)
           for name, shape in shapes.items()}
    for name, t in out.items():
        if base is not None:
            t.normal_(0.0, std / 10, generator=gen).add_(base[name])
        else:
            t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0.0, std, generator=gen)
    return out


def make_parents(config: LlamaConfig, needed: set[str], args) -> tuple[Parents, dict | None]:
    """The `needed` ones of base, a, b, and their HF folders (None if made in place)."""
    shapes = {k: v.shape for k, v in empty_model(config, "meta").state_dict().items()}
    order = [name for name in ("base", "a", "b") if name in needed]
    if args.from_tensors:
        if not hasattr(Parents, "from_tensors"):
            sys.exit("this mode needs Parents.from_tensors({name: {tensor: t}}, config)")
        made = {"base": random_state(shapes, args.device, 0)}
        made |= {name: random_state(shapes, args.device, seed, made["base"])
                 for seed, name in enumerate("ab", start=1) if name in needed}
        return Parents.from_tensors({n: made[n] for n in order}, config.to_dict()), None
    root = args.models_dir / args.shape
    paths, made = {name: root / name for name in ("base", "a", "b")}, {}
    for seed, (name, path) in enumerate(paths.items()):
        if not (path / "model.safetensors").is_file():
            made["base"] = made.get("base") or random_state(shapes, "cpu", 0)
            model = empty_model(config, "meta")
            model.load_state_dict(made["base"] if name == "base" else
                                  random_state(shapes, "cpu", seed, made["base"]), assign=True)
            partial = path.with_name(name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            model.save_pretrained(partial)  # transformers 5 writes safetensors only
            partial.rename(path)
            del model
    del made
    gc.collect()
    return Parents({name: paths[name] for name in order}), paths


def timed(fn, device: str = "cpu") -> float:
    """Seconds that `fn()` takes, with the GPU (if any) synchronised before and after."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of dst.copy_(src) on nbytes tensors, counting read + write (best of repeats)."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))


def time_ours(parents: Parents, model, recipe: MergeRecipe, repeats: int, device: str):
    """Median seconds of one write_into (merged weights in place) and of the wait for its
    weights hash after that (computed in the background while an engine would be scoring),
    after a warm-up; the upper median for an even count."""
    materializer = Materializer(parents)
    materializer.write_into(model, recipe).hexdigest()
    merges, hashes, alone, pending = [], [], [], []
    for _ in range(repeats):
        merges.append(timed(lambda: pending.append(materializer.write_into(model, recipe)),
                            device))
        hashes.append(timed(pending.pop().hexdigest))
        alone.append(timed(lambda: merge_alone(materializer, model, recipe), device))
    return tuple(sorted(x)[repeats // 2] for x in (merges, hashes, alone))


def merge_alone(materializer: Materializer, model, recipe: MergeRecipe) -> None:
    """write_into without hashing: the merge kernels' own speed."""
    method, plans = materializer.plan(recipe)
    targets = model.state_dict()
    for plan in plans:
        materializer.merge_into(method, recipe, plan, targets[plan.name])


def time_mergekit(method: str, paths: dict, work: Path) -> float | None:
    """Wall seconds of one `mergekit-yaml CONFIG OUT` (None if it failed); OUT is deleted."""
    config, out = work / f"mergekit_{method}.yml", work / f"mergekit_out_{method}"
    config.write_text(yaml.safe_dump(mergekit_config(method, paths)))
    shutil.rmtree(out, ignore_errors=True)
    exe = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) or "mergekit-yaml"
    start = time.perf_counter()
    proc = subprocess.run([exe, str(config), str(out)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode:
        print(f"mergekit {method} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return None if proc.returncode else seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: 1b on cpu, 8b on cuda")
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/bench_merge/models"))
    ap.add_argument("--from-tensors", action="store_true",
                    help="make the parents in memory, no disk (implied by --device cuda)")
    ap.add_argument("--methods", default="linear,slerp,ties")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--record", action="store_true", help="append to docs/benchmarks.md")
    args = ap.parse_args()
    run_start, cuda = time.perf_counter(), args.device.startswith("cuda")
    args.shape = args.shape or ("8b" if cuda else "1b")
    args.from_tensors = args.from_tensors or args.device != "cpu"
    hidden, intermediate, layers, vocab = SHAPES[args.shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, vocab_size=vocab,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=False, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    methods = [m for m in args.methods.split(",") if m in METHODS]
    notes = [f"- {m}: not registered in merging.methods.METHODS, skipped"
             for m in args.methods.split(",") if m not in METHODS]
    print(*notes, sep="\n", flush=True)
    if not methods:
        sys.exit("no method to time")
    parents, paths = make_parents(config, set().union(*(USES[m] for m in methods)), args)
    setup_s = time.perf_counter() - run_start
    model = empty_model(config, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    bandwidth = copy_bandwidth(args.device)
    target_bytes = sum(model.state_dict()[n].nbytes for n in parents.names)
    rows = []  # (method, seconds, bytes moved)
    for method in methods:
        moved = target_bytes + sum(parents.tensor(p, n).nbytes
                                   for p in USES[method] for n in parents.names)
        try:
            seconds = time_ours(parents, model, RECIPES[method], args.repeats, args.device)
        except Exception as exc:  # a method under development may fail: say so, go on
            notes.append(f"- {method}: write_into failed: {type(exc).__name__}: {exc}")
            print(notes[-1], flush=True)
            continue
        rows.append((method, seconds, moved))
        print(f"{method}: ours {seconds[0]:.3f} s + hash {seconds[1]:.3f} s "
              f"(merge alone {seconds[2]:.3f} s), {moved / 1e9:.2f} GB moved", flush=True)
    bandwidth = max(bandwidth, copy_bandwidth(args.device))
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    del parents, model
    gc.collect()

    mergekit = {}
    if args.no_mergekit or paths is None or importlib.util.find_spec("mergekit") is None:
        notes.append("- mergekit: not run (--no-mergekit, no parents on disk, or not importable)")
    else:
        for method, _, _ in rows:
            mergekit[method] = time_mergekit(method, paths, args.models_dir.parent)
            print(f"{method}: mergekit {mergekit[method]} s", flush=True)
        startup = timed(lambda: subprocess.run([sys.executable, "-c", "import mergekit.merge"]))
        notes.append(f"- mergekit-yaml: one run per method, its output deleted; of its time, "
                     f"python + `import mergekit.merge` alone take {startup:.1f} s")

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    where = torch.cuda.get_device_name() if cuda else f"{os.uname().machine} CPU"
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    lines = [
        f"Machine: {os.cpu_count()} cores, {ram:.0f} GiB RAM, {where}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Command: `{command}`",
        f"Model: random Llama ({args.shape}), {n_params / 1e9:.3f}B params, bf16; copy "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s; peak {'GPU memory' if cuda else 'RSS'} "
        f"{peak / 2**30:.1f} GiB; setup {setup_s:.0f} s, whole run "
        f"{time.perf_counter() - run_start:.0f} s; ours: median of {args.repeats} after a warm-up.",
        "Targets: linear within 2x of the floor (3x on GPU); ours at least 20x faster than "
        "mergekit per candidate.", "",
        "ours: write_into until the weights are in place (their sha256 runs in background "
        "threads meanwhile); + hash: the further wait for it; alone: the same merge with no "
        "hashing; mergekit/ours uses ours + hash.",
        "",
        "| method | alone ms | ours ms | floor ms | alone/floor | ours/floor | + hash ms "
        "| mergekit s | mergekit/ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, (seconds, hashing, alone), moved in rows:
        floor, mk = moved / bandwidth, mergekit.get(method)
        mk_cells = f"{mk:.1f} | {mk / (seconds + hashing):.1f}x" if mk else "- | -"
        ms = [f"{x * 1e3:.0f}" if x >= 0.01 else f"{x * 1e3:.2f}"
              for x in (alone, seconds, floor, hashing)]
        lines.append(f"| {method} | {ms[0]} | {ms[1]} | {ms[2]} | {alone / floor:.1f}x | "
                     f"{seconds / floor:.1f}x | {ms[3]} | {mk_cells} |")
    block = "\n".join(lines + ([""] + notes if notes else []))
    print("\n" + block)
    if args.record:
        with open(REPO / "docs" / "benchmarks.md", "a") as f:
            f.write(f"\n## Merger speed (bench/merge_speed.py)\n\n"
                    f"Date: {time.strftime('%Y-%m-%d')}. {block}\n")


if __name__ == "__main__":
    main()
