"""Correctness of the vLLM swap path, on a GPU with vLLM.

Two recipes (a per-layer linear merge, then DARE-TIES) are swapped one after the other into
one warm engine. For each, the script records greedy outputs of probe prompts and the
log-likelihoods of continuations, then compares them with
  - a fresh vLLM engine started from the exported folder of the same recipe, and
  - the HF engine on that folder,
and checks that the export rebuilds the bytes the warm engine hashed.

    python bench/gpu/vllm_correctness.py --shape tiny     # then --shape 8b

Checks (exit 1 if one fails):
  hash       the export's weights hash equals the one the warm engine returned;
  fresh      the fresh engine's greedy outputs equal the warm engine's, and every
             log-likelihood agrees within --tol-fresh per token;
  hf         the HF engine's log-likelihoods agree within --tol-hf per token (bf16 kernels
             differ); its greedy outputs are counted, not required (random weights have
             near-ties that different kernels break differently).
"""

from __future__ import annotations

import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from bench.gpu.models import (  # noqa: E402
    argument_parser,
    make_parents,
    parse_on_gpu,
    prompts,
    table,
)
from evaluators.engines import GenerationRequest, HFEngine, LoglikelihoodRequest  # noqa: E402
from evaluators.engines.vllm_engine import VLLMEngine, VLLMOptions  # noqa: E402
from merging import Materializer, MergeRecipe, Parents  # noqa: E402
from merging.materializer import WeightsHash  # noqa: E402
from search.export import write_model_folder  # noqa: E402

RECIPES = {
    "linear": MergeRecipe("linear", ("clinical", "instruct"), {
        "clinical": {"weight": {"layers.0": 0.9, "layers.1": 0.2, "*": 0.4}},
        "instruct": {"weight": {"layers.0": 0.1, "*": 0.6}}}),
    "dare_ties": MergeRecipe("dare_ties", ("clinical",), {
        "clinical": {"weight": 0.8, "density": 0.5}}, base="instruct", seed=3),
}


def requests(n: int, max_new_tokens: int):
    texts = prompts(n, seed=1)
    generation = [GenerationRequest(t, max_new_tokens=max_new_tokens) for t in texts]
    # continuations of several tokens, after raw-text contexts
    scoring = [LoglikelihoodRequest(t[: len(t) // 2], t[len(t) // 2 :][:40]) for t in texts]
    return generation, scoring


def run(engine, generation, scoring) -> dict:
    start = time.perf_counter()
    outputs = engine.generate(generation)
    scores = engine.loglikelihood(scoring)
    return {"outputs": outputs, "scores": scores, "seconds": time.perf_counter() - start}


def compare(warm: dict, other: dict, tokens: list[int]) -> tuple[int, float]:
    """(outputs equal, largest |difference| of summed log-likelihood per token)."""
    same = sum(a == b for a, b in zip(warm["outputs"], other["outputs"], strict=True))
    worst = max(abs(a[0] - b[0]) / n for a, b, n in
                zip(warm["scores"], other["scores"], tokens, strict=True))
    return same, worst


def main() -> None:
    parser = argument_parser(__doc__, shape="tiny", prompts=64, max_new_tokens=32)
    parser.add_argument("--tol-fresh", type=float, default=1e-3)
    parser.add_argument("--tol-hf", type=float, default=0.05)
    args = parse_on_gpu(parser, __file__)

    folders = make_parents(args.models, args.shape, ("clinical", "instruct"))
    options = VLLMOptions(dtype="bfloat16", max_model_len=2048, enforce_eager=args.eager)
    generation, scoring = requests(args.prompts, args.max_new_tokens)

    warm_engine = VLLMEngine(folders["instruct"], options, parents=folders)
    tokens = [warm_engine.continuation_tokens(r)[1] for r in scoring]
    warm = {}
    for name, recipe in RECIPES.items():  # one after the other into the same engine
        digest = warm_engine.load_recipe(recipe).hexdigest()
        warm[name] = {"hash": digest, **run(warm_engine, generation, scoring)}
    print(f"warm engine: started {warm_engine.timings['start']:.1f} s, parents "
          f"{warm_engine.timings['parents']:.1f} s ({warm_engine.plan.summary()})")
    warm_engine.close()

    parents = Parents(folders, "memory")
    rows, failed = [], False
    for name, recipe in RECIPES.items():
        export = args.models / args.shape / f"export-{name}"
        digest = WeightsHash()
        write_model_folder(export, Materializer(parents).tensors(
            recipe, torch.bfloat16, digest, device="cuda"), folders["instruct"],
            torch.bfloat16, {}, force=True)
        hash_ok = digest.hexdigest() == warm[name]["hash"]
        torch.cuda.empty_cache()  # the export's merge must not crowd the fresh engine
        fresh_engine = VLLMEngine(export, options)
        fresh = run(fresh_engine, generation, scoring)
        fresh_engine.close()
        hf_engine = HFEngine(export, device="cuda", dtype="bfloat16", batch_size=16)
        hf = run(hf_engine, generation, scoring)
        hf_engine.close()
        shutil.rmtree(export)
        same_fresh, diff_fresh = compare(warm[name], fresh, tokens)
        same_hf, diff_hf = compare(warm[name], hf, tokens)
        checks = {"hash": hash_ok,
                  "fresh": same_fresh == len(generation) and diff_fresh <= args.tol_fresh,
                  "hf": diff_hf <= args.tol_hf}
        failed |= not all(checks.values())
        rows.append([args.shape, name, "yes" if hash_ok else "NO",
                     f"{same_fresh}/{len(generation)}", f"{diff_fresh:.2e}",
                     f"{same_hf}/{len(generation)}", f"{diff_hf:.2e}",
                     ", ".join(k for k, ok in checks.items() if not ok) or "pass"])
    print(table(["shape", "recipe", "export hash = warm", "fresh outputs equal",
                 "fresh max |dlogp|/token", "hf outputs equal", "hf max |dlogp|/token",
                 "result"], rows))
    print(f"gpu: {torch.cuda.get_device_name(0)}; vllm {version('vllm')}; "
          f"torch {torch.__version__}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
