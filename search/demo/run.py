"""`mergesearch demo`: the whole product once, on tiny models, on a laptop CPU.

Copies the shipped parents and probe sets into OUT, writes the spec there, runs the study
(each parent and their average first, then TPE on per-layer weights for both objectives),
scores the baselines and the best trials on the test split, prints the comparison, writes
the report page to OUT/report, exports the selected merge to OUT/export and generates with it
through plain transformers.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from mergesearch.errors import MergesearchError
from search.demo.synthetic import RADIOLOGY_PROMPT
from search.export import export_trial
from search.report import build_report
from search.report_page import write_report
from search.run import format_report, launch_study
from search.study import load_study

ASSETS = Path(__file__).parent / "assets"
_DEMO_FILES = ("spec.yaml", "study.db", "study.artifacts", "models", "probes", "export",
               "report")


def _prepare(out: Path) -> Path:
    """Fresh demo inputs in `out`; an earlier demo's outputs there are replaced."""
    if out.exists() and any(p.name not in _DEMO_FILES for p in out.iterdir()):
        raise MergesearchError(f"{out} holds files that are not the demo's; pass another --out")
    for name in _DEMO_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for parent in ("clinical", "instruct"):
        shutil.copytree(ASSETS / "models" / parent, out / "models" / parent)
    shutil.copytree(ASSETS / "probes", out / "probes")
    shutil.copy(ASSETS / "spec.yaml", out / "spec.yaml")
    return out / "spec.yaml"


def _mean(values: dict[str, float] | None) -> float | None:
    return None if not values else sum(values.values()) / len(values)


def run_demo(out: Path, n_trials: int = 30, echo: Callable[[str], None] = print) -> dict:
    spec_path = _prepare(out)
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    echo(f"demo: running {n_trials} trials; study in {out / 'study.db'}")
    began = time.perf_counter()
    echo(launch_study(spec_path, n_trials=n_trials))
    echo(f"study took {time.perf_counter() - began:.1f} s (trials and test scoring)")
    study = load_study(storage, None)
    report = build_report(study)
    echo(format_report(report))

    selected = next(b for b in report["best"] if b["trial"] == report["selected"])
    merged = _mean(selected["test"])
    parents = {b["name"]: _mean(b["test"]) for b in report["baselines"] if b["name"] != "uniform"}
    echo("\nmean of the test objectives: " + ", ".join(
        [f"{name} {value:.4f}" for name, value in parents.items()]
        + [f"selected merge (trial {selected['trial']}) {merged:.4f}"]))
    beaten = all(merged > value for value in parents.values())
    echo("the selected merge beats both parents on the test mean" if beaten else
         "the selected merge does NOT beat both parents on the test mean")

    export_dir = out / "export"
    export_trial(study, "knee", export_dir, force=True)
    echo(f"\nexported trial {selected['trial']} to {export_dir}; generating with transformers")
    item = _first_test_item(out / "probes" / "radiology.jsonl")
    echo(f"findings:   {item['findings']}\nreference:  {item['impression']}\n"
         f"merged:     {generate_sample(export_dir, RADIOLOGY_PROMPT.format(**item))}")
    page, = write_report(report, out / "report")
    echo(f"\nreport with figures: {page}\n"
         f"next: mergesearch dashboard --storage {storage}")
    return report


def _first_test_item(path: Path) -> dict:
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return next(row for row in rows if row["split"] == "test")


def generate_sample(model_dir: Path, prompt: str) -> str:
    """One greedy completion by plain transformers, as a user would load the export."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
