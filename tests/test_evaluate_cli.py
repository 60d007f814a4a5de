"""`mergesearch evaluate` on a spec with all four probe kinds: every item's output and
scores reach the items file, and the objectives are the probes' aggregates."""

from __future__ import annotations

import json

from tests.conftest import write_jsonl
from tests.test_lm_eval_probe import TEXT, _task


def test_evaluate_runs_the_four_probe_kinds(cli, write_spec, parents, probe_files, tmp_path):
    choice = write_jsonl(tmp_path / "qa.jsonl", [
        {"id": f"q{i}", "question": "Is the effusion small?", "options": ["yes", "no", "maybe"],
         "answer": i % 3, "split": ("dev", "test")[i % 2]} for i in range(6)])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc = write_jsonl(tasks / "mc.jsonl", [
        {"question": f"lungs clear {i}", "choices": ["yes", "no"], "answer": i % 2}
        for i in range(10)])
    _task(tasks, "tiny_mc", mc, output_type="multiple_choice", doc_to_text=TEXT,
          doc_to_target="answer", doc_to_choice="{{choices}}",
          metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    spec = write_spec(probes=[
        {"name": "radiology", "kind": "generation", "path": str(probe_files["radiology"]),
         "fields": {"input": "findings", "reference": "impression"},
         "template": "Summarize: {{ findings }}", "max_new_tokens": 6},
        {"name": "ifeval", "kind": "instruction", "path": str(probe_files["instructions"]),
         "max_new_tokens": 6},
        {"name": "qa", "kind": "choice", "path": str(choice)},
        {"name": "lm", "kind": "lm_eval", "task": "tiny_mc", "include_path": str(tasks)},
    ], objectives=[{"name": "clinical", "probes": ["radiology"]},
                   {"name": "instruction", "probes": ["ifeval"]},
                   {"name": "medqa", "probes": ["qa", "lm"], "metric": "acc"}])
    items = tmp_path / "items.jsonl"
    code, out, err = cli("evaluate", spec, "--model", parents["instruct"], "--json",
                         "--items", items)
    assert code == 0, err
    result = json.loads(out)
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    counts = {p: sum(r["probe"] == p for r in rows) for p in ("radiology", "ifeval", "qa", "lm")}
    assert counts["radiology"] == counts["ifeval"] == 4 and counts["qa"] == 3
    assert counts["lm"] > 0
    assert all(isinstance(r["output"], str) and r["scores"] for r in rows)
    for probe in ("qa", "lm"):
        mine = [r["scores"]["acc"] for r in rows if r["probe"] == probe]
        assert result["probes"][probe]["acc"] == sum(mine) / len(mine)
    assert result["objectives"]["medqa"] == (result["probes"]["qa"]["acc"]
                                             + result["probes"]["lm"]["acc"]) / 2


def test_the_example_spec_over_the_shipped_probe_sets_builds():
    from pathlib import Path

    from search.spec import load_spec
    from search.workbench import build_suite

    spec = load_spec(Path(__file__).parents[1] / "examples/clinical_suite.yaml")
    suite = build_suite(spec)
    assert {type(p).__name__ for p in suite.probes.values()} == {
        "GenerationProbe", "InstructionProbe", "ChoiceProbe"}
    assert all(p.items("dev") and p.items("test") for p in suite.probes.values())
