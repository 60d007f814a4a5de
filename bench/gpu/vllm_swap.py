"""Swap speed of the vLLM engine on Llama-3.1-8B shapes, on a GPU with vLLM.

In one run, on two 8B-shaped bf16 parents with random weights (made on the GPU, written
once under --models):
  floor     the HBM floor: moving the model's bytes once (read + write), at the copy
            bandwidth of `dst.copy_(src)` on 4 GiB (best of 10), measured before vLLM starts;
  start     vLLM engine start and the parents read into its worker, once;
  swap      per trial, merge + write into the live weights + prefix-cache reset, for linear
            and TIES (median of --trials, each a new random per-layer recipe), without and
            with the weights hash;
  anchors   what a candidate costs on disk: writing the merged model, starting a fresh
            engine on it, and reading it from disk into the running engine;
  generate  --prompts probe-length prompts of --max-new-tokens greedy tokens, vLLM against
            the HF engine on the same weights.
Targets: linear swap within 3x of the floor, and at least 100x cheaper than write + restart.

    python bench/gpu/vllm_swap.py            # --shape tiny for a smoke run
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
from importlib.metadata import version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from bench.gpu.models import (  # noqa: E402
    argument_parser,
    generation_speed,
    make_parents,
    parse_on_gpu,
    prompts,
    table,
)
from bench.merge_speed import copy_bandwidth, timed  # noqa: E402
from evaluators.engines import GenerationRequest, HFEngine  # noqa: E402
from evaluators.engines.vllm_engine import VLLMEngine, VLLMOptions  # noqa: E402
from merging import Materializer, MergeRecipe, Parents  # noqa: E402
from merging.parents import num_hidden_layers, read_config  # noqa: E402
from search.export import write_model_folder  # noqa: E402


def random_recipe(method: str, layers: int, rng: random.Random) -> MergeRecipe:
    genes = [f"layers.{i}" for i in range(layers)] + ["embed", "norm", "lm_head"]
    weight = {gene: round(rng.random(), 4) for gene in genes}
    if method == "linear":
        return MergeRecipe("linear", ("clinical", "instruct"), {
            "clinical": {"weight": weight},
            "instruct": {"weight": {g: 1.0 - w for g, w in weight.items()}}})
    return MergeRecipe("ties", ("clinical",), {"clinical": {"weight": weight, "density": 0.5}},
                       base="instruct")


def main() -> None:
    parser = argument_parser(__doc__, shape="8b", prompts=300, max_new_tokens=128)
    parser.add_argument("--trials", type=int, default=10)
    args = parse_on_gpu(parser, __file__)

    folders = make_parents(args.models, args.shape, ("clinical", "instruct"))
    layers = num_hidden_layers(read_config(folders["instruct"]))
    model_bytes = sum(p.stat().st_size for p in folders["instruct"].glob("*.safetensors"))
    bandwidth = copy_bandwidth("cuda", nbytes=4 << 30)
    floor = 2 * model_bytes / bandwidth
    torch.cuda.empty_cache()  # the copy's buffers must not crowd the engine
    rows = [["HBM floor (model bytes read + written once)", f"{floor * 1e3:.1f} ms",
             f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, model {model_bytes / 2**30:.1f} GiB"]]
    results: dict = {"floor_s": floor, "bandwidth": bandwidth, "model_bytes": model_bytes}

    options = VLLMOptions(dtype="bfloat16", max_model_len=4096, enforce_eager=args.eager)
    engine = VLLMEngine(folders["instruct"], options, parents=folders)  # TIES: whole tensors
    results |= {"start_s": engine.timings["start"], "parents_s": engine.timings["parents"]}
    rows += [["engine start (once)", f"{engine.timings['start']:.1f} s", ""],
             ["parents read into the worker (once)", f"{engine.timings['parents']:.1f} s",
              engine.plan.summary()]]

    rng = random.Random(0)
    for method in ("linear", "ties"):
        for hashed in (False, True):
            trials = [random_recipe(method, layers, rng) for _ in range(args.trials + 1)]
            engine.load_recipe(trials[0], hash_weights=hashed)  # warm-up
            seconds = [timed(lambda r=r, h=hashed: engine.load_recipe(r, hash_weights=h),
                             "cuda") for r in trials[1:]]
            median = statistics.median(seconds)
            results[f"swap_{method}{'_hashed' if hashed else ''}_s"] = seconds
            rows.append([f"swap {method}{' + weights hash' if hashed else ''} (median of "
                         f"{args.trials})", f"{median * 1e3:.1f} ms",
                         f"{median / floor:.1f}x floor; min {min(seconds) * 1e3:.1f} ms"])

    requests = [GenerationRequest(p, max_new_tokens=args.max_new_tokens)
                for p in prompts(args.prompts)]
    vllm_speed = generation_speed(engine, requests)

    recipe = random_recipe("linear", layers, rng)
    merged = args.models / args.shape / "merged"
    write_s = timed(lambda: write_model_folder(
        merged, Materializer(Parents(folders, "memory")).tensors(recipe, torch.bfloat16,
                                                                 device="cuda"),
        folders["instruct"], torch.bfloat16, {}, force=True), "cuda")
    reload_s = timed(lambda: engine.llm.collective_rpc("mergesearch_load_folder",
                                                       args=(str(merged),)), "cuda")
    engine.close()
    restart = VLLMEngine(merged, options)
    restart_s = restart.timings["start"]
    restart.close()
    swap = statistics.median(results["swap_linear_s"])
    rows += [["anchor: write merged model to disk", f"{write_s:.1f} s", ""],
             ["anchor: write + restart engine on it", f"{write_s + restart_s:.1f} s",
              f"{(write_s + restart_s) / swap:.0f}x the linear swap"],
             ["anchor: reload from disk into the running engine", f"{reload_s:.1f} s",
              f"{(write_s + reload_s) / swap:.0f}x the linear swap with the write"]]
    results |= {"write_s": write_s, "restart_s": restart_s, "reload_s": reload_s}

    hf = HFEngine(merged, device="cuda", dtype="bfloat16", batch_size=32)
    hf_speed = generation_speed(hf, requests)
    hf.close()
    shutil.rmtree(merged)
    for name, (per_s, tokens_s) in (("vLLM", vllm_speed), ("HF engine", hf_speed)):
        rows.append([f"generate {len(requests)} prompts x {args.max_new_tokens} tokens, "
                     f"{name}", f"{tokens_s:.0f} tokens/s", f"{per_s:.1f} requests/s"])
    results |= {"vllm_generate": vllm_speed, "hf_generate": hf_speed}

    print(table(["measure", "value", "note"], rows))
    print(f"shape {args.shape}; gpu: {torch.cuda.get_device_name(0)}; vllm {version('vllm')}; "
          f"torch {torch.__version__}; eager {args.eager}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"vllm_swap_{args.shape}.json").write_text(
            json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
