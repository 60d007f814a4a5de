"""Fixtures: a tokenizer, tiny Llama parents and probe files, all built offline here."""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import create_trial
from transformers import LlamaForCausalLM

from search.demo import synthetic
from search.demo.build import build_tokenizer, save_model, tiny_llama_config
from search.spec import parse_spec
from search.study import CONSTRAINTS_ATTR, OBJECTIVES_ATTR, SPEC_ATTR

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1)


@pytest.fixture(scope="session")
def tokenizer():
    rng = random.Random(0)
    corpus = [e.prompt + " " + e.response for e in
              [synthetic.radiology_example(rng) for _ in range(200)]
              + [synthetic.instruction_example(rng) for _ in range(200)]]
    return build_tokenizer(corpus, vocab_size=400)


def make_model(folder: Path, tokenizer, seed: int, base: LlamaForCausalLM | None = None,
               noise: float = 0.02, **overrides) -> LlamaForCausalLM:
    """A tiny Llama saved to `folder`: random, or `base` plus seeded noise (a 'fine-tune')."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **{**TINY, **overrides}))
    if base is not None:
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    save_model(model, tokenizer, folder)
    return model


@pytest.fixture(scope="session")
def parents(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Two fine-tunes of one random base: `clinical` and `instruct`, plus the base."""
    root = tmp_path_factory.mktemp("models")
    base = make_model(root / "base", tokenizer, seed=0)
    make_model(root / "clinical", tokenizer, seed=1, base=base)
    make_model(root / "instruct", tokenizer, seed=2, base=base)
    return {name: root / name for name in ("base", "clinical", "instruct")}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def probe_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probes")
    rng = random.Random(5)
    radiology = [{"id": f"r{i}", **synthetic.radiology_item(rng), "split": ("dev", "test")[i % 2]}
                 for i in range(8)]
    instructions = []
    for i in range(8):
        item = synthetic.instruction_item(rng)
        instructions.append({"key": i, "prompt": item["prompt"],
                             "instruction_id_list": item["instruction_id_list"],
                             "kwargs": item["kwargs"], "split": ("dev", "test")[i % 2]})
    return {"radiology": write_jsonl(root / "radiology.jsonl", radiology),
            "instructions": write_jsonl(root / "instructions.jsonl", instructions)}


def spec_dict(models: dict[str, Path], probe_files: dict[str, Path], **changes) -> dict:
    spec = {
        "name": "tiny",
        "seed": 0,
        "parents": [{"name": "clinical", "path": str(models["clinical"])},
                    {"name": "instruct", "path": str(models["instruct"])}],
        "merge": {"method": "linear", "genes": "per_layer"},
        "probes": [
            {"name": "radiology", "kind": "generation", "path": str(probe_files["radiology"]),
             "fields": {"input": "findings", "reference": "impression"},
             "template": "Summarize: {{ findings }}", "max_new_tokens": 8},
            {"name": "ifeval", "kind": "instruction", "path": str(probe_files["instructions"]),
             "max_new_tokens": 8},
        ],
        "objectives": [{"name": "clinical", "probes": ["radiology"]},
                       {"name": "instruction", "probes": ["ifeval"], "metric": "inst_level_loose"}],
        "budget": {"n_trials": 4},
        "engine": {"device": "cpu", "batch_size": 8},
        "evaluation": {"test_top_k": 1},
    }
    spec.update(changes)
    return spec


@pytest.fixture
def write_spec(tmp_path, parents, probe_files):
    def write(**changes) -> Path:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec_dict(parents, probe_files, **changes),
                                       sort_keys=False))
        return path
    return write


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `mergesearch ARGS...` in this process: (exit code, stdout, stderr)."""
    from search.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["mergesearch", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err
    return run


def scored_study(url: str, spec: dict, points, constraints=None, states=()) -> optuna.Study:
    """A study holding a mergesearch spec and trials with these dev values (constraint values
    per trial where given), then trials in `states` (failed, pruned) without values."""
    directions = [o.get("direction", "maximize") for o in spec["objectives"]]
    study = optuna.create_study(study_name=spec["name"], storage=url, directions=directions)
    study.set_user_attr(SPEC_ATTR, parse_spec(spec, "test").to_json_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o["name"] for o in spec["objectives"]])
    names = [o["name"] for o in spec["objectives"]]
    for i, values in enumerate(points):
        attrs = {OBJECTIVES_ATTR: dict(zip(names, values, strict=True))}
        if constraints is not None:
            attrs[CONSTRAINTS_ATTR] = [constraints[i]]
        study.add_trial(create_trial(values=list(values), user_attrs=attrs))
    for state in states:
        study.add_trial(create_trial(state=state))
    return study
