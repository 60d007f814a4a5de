"""Evaluator speed on public data in its original formats (../shared/data by default).

In one run it measures:
  (a) IFEval scoring of all 541 prompts' responses (lm-eval's checkers, through our
      instruction probe), and checks that our prompt- and instruction-level accuracies equal
      lm-eval's own aggregation of its per-item results on the same outputs;
  (b) ROUGE-1/2/L + BLEU of 1,000 (output, reference) pairs (Open-i impressions scored
      against other impressions, so the pairs are realistic text);
  (c) the suite's overhead: raw `engine.generate` of an Open-i probe's prompts against the
      same prompts through `Suite.chunks` (prompting, scoring) plus writing every item to
      JSONL, best of --repeats each, alternating.
Targets (issue 4): (a) and (b) under a second each on CPU; (c) under 5%.
Responses for (a) come from the model given (default: the demo's instruct model), generated
once, so the figures are about scoring, not about generation.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from evaluators.engines import HFEngine  # noqa: E402
from evaluators.probes import build_probe  # noqa: E402
from evaluators.probes.generation import GenerationProbeConfig  # noqa: E402
from evaluators.probes.ifeval_checks import (  # noqa: E402
    ensure_sentence_tokenizer,
    instruction_results,
)
from evaluators.probes.instruction import InstructionProbeConfig  # noqa: E402
from evaluators.suite import ObjectiveDef, Suite  # noqa: E402


def _ifeval(data: Path, engine: HFEngine, max_new_tokens: int) -> list[list[str]]:
    ensure_sentence_tokenizer()  # before lm-eval's IFEval module, which would download it
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc

    probe = build_probe(InstructionProbeConfig(
        kind="instruction", name="ifeval", path=data / "ifeval/input_data.jsonl",
        max_new_tokens=max_new_tokens), "ifeval")
    items = probe.items("dev") + probe.items("test")
    outputs = engine.generate([item.request for item in items])
    began = time.perf_counter()
    scores = [probe.score(item, output) for item, output in zip(items, outputs, strict=True)]
    ours = {m: probe.aggregate(scores, m) for m in probe.metrics}
    seconds = time.perf_counter() - began
    # lm-eval's own path: its per-doc results, then its aggregations.
    results = [instruction_results(item.data, output)
               for item, output in zip(items, outputs, strict=True)]
    theirs = {
        "prompt_level_strict": sum(r["prompt_level_strict_acc"] for r in results) / len(results),
        "prompt_level_loose": sum(r["prompt_level_loose_acc"] for r in results) / len(results),
        "inst_level_strict": agg_inst_level_acc([r["inst_level_strict_acc"] for r in results]),
        "inst_level_loose": agg_inst_level_acc([r["inst_level_loose_acc"] for r in results]),
    }
    same = all(abs(ours[m] - theirs[m]) < 1e-12 for m in theirs)
    return [["(a) IFEval scoring", f"{len(items)} responses", f"{seconds:.3f} s",
             "< 1 s", "met" if seconds < 1 else "missed"],
            ["    equals lm-eval's aggregation", ", ".join(f"{m} {ours[m]:.4f}" for m in ours),
             "", "equal", "yes" if same else "NO"]]


def _rouge(data: Path) -> list[list[str]]:
    rows = [json.loads(line) for name in ("validate", "test")
            for line in (data / f"openi/{name}.jsonl").read_text().splitlines()]
    config = GenerationProbeConfig(kind="generation", name="openi",
                                   path=data / "openi/validate.jsonl",
                                   fields={"id": "idx", "input": "inputs", "reference": "target"})
    probe = build_probe(config, "openi")
    item = probe.items("dev")[0]
    pairs = [(rows[i % len(rows)]["target"], rows[(i * 7 + 3) % len(rows)]["target"])
             for i in range(1000)]
    began = time.perf_counter()
    for output, reference in pairs:
        probe.score(type(item)(item.id, item.prompt, None, {"reference": reference}), output)
    seconds = time.perf_counter() - began
    return [["(b) ROUGE-1/2/L + BLEU", "1000 pairs", f"{seconds:.3f} s", "< 1 s",
             "met" if seconds < 1 else "missed"]]


def _overhead(data: Path, engine: HFEngine, n_items: int, chunk: int,
              repeats: int) -> list[list[str]]:
    config = GenerationProbeConfig(
        kind="generation", name="openi", path={"dev": data / "openi/validate.jsonl",
                                               "test": data / "openi/test.jsonl"},
        fields={"id": "idx", "input": "inputs", "reference": "target"}, limit=n_items,
        template="Summarize the radiology findings into a short impression.\n"
                 "Findings: {{ input }}", max_new_tokens=32)
    probe = build_probe(config, "openi")
    suite = Suite({"openi": probe}, [ObjectiveDef("clinical", ("openi",))])
    items = probe.items("dev")

    def raw() -> None:
        for start in range(0, len(items), chunk):
            engine.generate([item.request for item in items[start : start + chunk]])

    def through_suite() -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
            results = []
            for part in suite.chunks(engine, "dev", chunk):
                for result in part:
                    f.write(json.dumps(result.to_dict()) + "\n")
                results += part
            suite.summarize(results)

    times: dict[str, list[float]] = {"raw": [], "suite": []}
    raw()  # warm-up
    for _ in range(repeats):
        for name, fn in (("raw", raw), ("suite", through_suite)):
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    best_raw, best_suite = min(times["raw"]), min(times["suite"])
    overhead = (best_suite - best_raw) / best_raw
    return [["(c) raw engine.generate", f"{len(items)} Open-i prompts", f"{best_raw:.3f} s", "",
             ""],
            ["    through the suite + JSONL", f"chunks of {chunk}", f"{best_suite:.3f} s", "", ""],
            ["    suite overhead", f"best of {repeats}", f"{overhead:+.1%}", "< 5%",
             "met" if overhead < 0.05 else "missed"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data")
    parser.add_argument("--model", type=Path,
                        default=REPO / "search/demo/assets/models/instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--items", type=int, default=64, help="prompts for (c)")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ifeval-tokens", type=int, default=64)
    args = parser.parse_args()
    engine = HFEngine(args.model, device=args.device, batch_size=args.chunk)
    rows = _ifeval(args.data, engine, args.ifeval_tokens) + _rouge(args.data) + _overhead(
        args.data, engine, args.items, args.chunk, args.repeats)
    print(f"# {platform.machine()}, {platform.python_version()}, model {args.model.name}, "
          f"device {args.device}")
    print("| measure | work | time | target | result |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
