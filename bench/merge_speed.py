"""Merger speed: in-memory materialisation per trial vs. the memory floor and vs. mergekit.

Measures, in one run, on a random Llama (`--shape 1b`: ~1.1B parameters, bf16):
  (a) `Materializer(parents).write_into(model, recipe)` per trial for `linear`, `slerp` and
      `ties` (median of `--repeats` after one warm-up; methods not in METHODS are skipped);
  (b) the floor: the bytes a trial must move (each parent the recipe uses read once in its
      stored dtype, plus the target written once) over the copy bandwidth measured here
      (`dst.copy_(src)` on 1 GiB tensors, 2*bytes/time, best of 5);
  (c) `mergekit-yaml CONFIG OUT` on the same merge, as subprocess wall time: what a user of
      mergekit-evolve's on-disk mode pays per candidate (CPU mode only).
Targets: linear within 2x of the floor; in-memory per trial at least 20x faster than
mergekit's per-candidate merge; on GPU (`--device cuda --shape 8b`, parents made on the device
through `Parents.from_tensors`, no disk), linear within 3x of the HBM floor.

Usage: .venv/bin/python bench/merge_speed.py [--device cpu|cuda] [--shape 1b|8b]
           [--models-dir DIR] [--repeats N] [--methods linear,slerp,ties] [--no-mergekit]
           [--threads N] [--record]
--record appends the printed block to docs/benchmarks.md; otherwise it is only printed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import os
import platform
import resource
import shlex
import shutil
import statistics
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

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}
RECIPES = {
    "linear": MergeRecipe(method="linear", models=("a", "b"),
                          model_params={"a": {"weight": 0.4}, "b": {"weight": 0.6}}),
    "slerp": MergeRecipe(method="slerp", models=("b",), base="a", params={"t": 0.4}),
    "ties": MergeRecipe(method="ties", models=("a", "b"), base="base",
                        model_params={"a": {"weight": 0.5, "density": 0.5},
                                      "b": {"weight": 0.5, "density": 0.5}}),
}


def mergekit_config(method: str, paths: dict[str, Path]) -> dict:
    """The mergekit YAML for the same merge as RECIPES[method]."""
    p = {name: str(path) for name, path in paths.items()}
    if method == "linear":
        models = [{"model": p["a"], "parameters": {"weight": 0.4}},
                  {"model": p["b"], "parameters": {"weight": 0.6}}]
        return {"merge_method": "linear", "models": models, "dtype": "bfloat16"}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": p["a"], "parameters": {"t": 0.4},
                "models": [{"model": p["a"]}, {"model": p["b"]}], "dtype": "bfloat16"}
    models = [{"model": p[m], "parameters": {"weight": 0.5, "density": 0.5}} for m in "ab"]
    return {"merge_method": "ties", "base_model": p["base"], "models": models,
            "dtype": "bfloat16"}


def llama_config(shape: str) -> LlamaConfig:
    return LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, dtype="bfloat16",
                       max_position_embeddings=4096, architectures=["LlamaForCausalLM"])


def empty_model(config: LlamaConfig, device: str) -> LlamaForCausalLM:
    """A bf16 Llama with uninitialised storage (built on meta, so nothing is filled twice)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).to_empty(device=device).eval()


def random_state(shapes: dict, device: str, seed: int, base: dict | None = None) -> dict:
    """Seeded bf16 weights: a 'base' (N(0, 0.02), norms 1) or `base` + N(0, 0.002) noise."""
    gen = torch.Generator(device).manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.bfloat16, device=device)
        if base is not None:
            t.normal_(0.0, 0.002, generator=gen).add_(base[name])
        elif name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        out[name] = t
    return out


def build_checkpoints(config: LlamaConfig, shapes: dict, root: Path, seed: int) -> dict:
    """Save base, a, b (HF folders: config.json + model.safetensors) under root; reuse them."""
    paths = {name: root / name for name in ("base", "a", "b")}
    base = None
    for i, (name, path) in enumerate(paths.items()):
        if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
            continue
        base = base or random_state(shapes, "cpu", seed)
        state = base if name == "base" else random_state(shapes, "cpu", seed + i, base)
        model = empty_model(config, "meta")
        model.load_state_dict(state, assign=True)
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)  # safetensors is transformers 5's only format
        tmp.rename(path)
        del model, state
    del base
    gc.collect()
    return paths


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of dst.copy_(src) on nbytes tensors, counting read + write (best of repeats)."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def time_ours(parents: Parents, model, recipe: MergeRecipe, repeats: int, device: str):
    materializer = Materializer(parents)
    materializer.write_into(model, recipe)  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        materializer.write_into(model, recipe)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_mergekit(method: str, paths: dict, work: Path) -> float | None:
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
        return None
    return seconds


def mergekit_startup() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mergekit.merge, mergekit.config"], check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="model shape (default: 1b on cpu, 8b on cuda)")
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/bench_merge/models"))
    ap.add_argument("--methods", default="linear,slerp,ties")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--record", action="store_true", help="append to docs/benchmarks.md")
    args = ap.parse_args()
    run_start = time.perf_counter()
    cuda = args.device.startswith("cuda")
    shape = args.shape or ("8b" if cuda else "1b")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = llama_config(shape)
    shapes = {k: v.shape for k, v in empty_model(config, "meta").state_dict().items()}
    n_params = sum(s.numel() for s in shapes.values())

    paths = None
    if cuda:  # parents made on the device, no disk; needs Parents.from_tensors
        if not hasattr(Parents, "from_tensors"):
            sys.exit("--device cuda needs Parents.from_tensors({name: {tensor: t}}, config)")
        base = random_state(shapes, args.device, args.seed)
        tensors = {"base": base, **{m: random_state(shapes, args.device, args.seed + i, base)
                                    for i, m in ((1, "a"), (2, "b"))}}
        parents = Parents.from_tensors(tensors, config.to_dict())
        del base, tensors
    else:
        paths = build_checkpoints(config, shapes, args.models_dir / shape, args.seed)
        parents = Parents(paths)
    built_s = time.perf_counter() - run_start
    model = empty_model(config, args.device)
    bandwidth = copy_bandwidth(args.device)
    target_bytes = sum(model.state_dict()[n].nbytes for n in parents.names)

    rows, notes, ours = [], [], {}
    for method in args.methods.split(","):
        if method not in METHODS:
            notes.append(f"- {method}: not registered in merging.methods.METHODS, skipped")
            print(notes[-1], flush=True)
            continue
        recipe = RECIPES[method]
        used = {*recipe.models, *([recipe.base] if recipe.base else [])}
        moved = target_bytes + sum(parents.tensor(p, n).nbytes for p in used for n in parents.names)
        try:
            ours[method] = time_ours(parents, model, recipe, args.repeats, args.device)
        except Exception as exc:  # a method being developed may fail; report, go on
            notes.append(f"- {method}: write_into failed: {type(exc).__name__}: {exc}")
            print(notes[-1], flush=True)
            continue
        floor = moved / bandwidth
        rows.append([method, ours[method], floor])
        print(f"{method}: ours {ours[method]:.2f} s, floor {floor:.3f} s "
              f"({moved / 1e9:.1f} GB moved)", flush=True)
    del parents, model
    gc.collect()
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    mergekit = {}
    if cuda or args.no_mergekit:
        notes.append("- mergekit: not run (" + ("no checkpoints on disk in --device cuda mode"
                                                 if cuda else "--no-mergekit") + ")")
    elif importlib.util.find_spec("mergekit") is None:
        notes.append("- mergekit: not importable in this environment, skipped")
    else:
        work = args.models_dir.parent
        for method in ours:
            mergekit[method] = time_mergekit(method, paths, work)
            print(f"{method}: mergekit {mergekit[method]} s", flush=True)
        notes.append(f"- mergekit-yaml: one run per method, outputs written to {work} and "
                     f"deleted; its startup alone (python + `import mergekit.merge`) took "
                     f"{mergekit_startup():.1f} s; child peak RSS "
                     f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.1f} GiB")

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    where = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU"
    exe = os.path.relpath(sys.executable)
    command = shlex.join([exe if not exe.startswith("..") else sys.executable, *sys.argv])
    lines = [
        f"Machine: {os.cpu_count()} cores, {ram:.0f} GiB RAM, {where}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Command: `{command}`",
        f"Model: random Llama ({shape}), {n_params / 1e9:.3f}B params, bf16; copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; peak {'GPU memory' if cuda else 'RSS'} "
        f"{peak / 2**30:.1f} GiB; setup {built_s:.0f} s, whole run "
        f"{time.perf_counter() - run_start:.0f} s; ours = median of {args.repeats} after a warm-up.",
        "Targets: linear within 2x of the floor (3x of the HBM floor on GPU); ours at least 20x "
        "faster than mergekit per candidate.",
        "",
        "| method | ours ms | floor ms | ours/floor | mergekit s | mergekit/ours |",
        "|---|---|---|---|---|---|",
    ]
    for method, t, floor in rows:
        mk = mergekit.get(method)
        mk_cells = f"{mk:.1f} | {mk / t:.0f}x" if mk else "- | -"
        lines.append(f"| {method} | {t * 1e3:.0f} | {floor * 1e3:.0f} | {t / floor:.1f}x "
                     f"| {mk_cells} |")
    block = "\n".join(lines + ([""] + notes if notes else []))
    print("\n" + block)
    if args.record:
        with open(REPO / "docs" / "benchmarks.md", "a") as f:
            f.write(f"\n## Merger speed (bench/merge_speed.py)\n\n"
                    f"Date: {datetime.date.today().isoformat()}. {block}\n")


if __name__ == "__main__":
    main()
