"""The demo's model builder and shipped assets."""

import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from merging import Parents
from search.demo.build import ASSETS, build
from search.spec import load_spec


def test_builder_makes_loadable_models_and_disjoint_probes(tmp_path):
    build(tmp_path, seed=1, base_steps=3, tune_steps=2, batch_size=4)
    for name in ("base", "clinical", "instruct"):
        folder = tmp_path / "models" / name
        AutoModelForCausalLM.from_pretrained(folder)
        assert AutoTokenizer.from_pretrained(folder).chat_template
    Parents({n: tmp_path / "models" / n for n in ("base", "clinical", "instruct")})
    for probe, key in (("radiology.jsonl", "findings"), ("instructions.jsonl", "prompt")):
        rows = [json.loads(line) for line in (tmp_path / "probes" / probe).read_text().splitlines()]
        assert {r["split"] for r in rows} == {"dev", "test"}
        assert len({r[key] for r in rows}) == len(rows)


def test_shipped_demo_assets_are_a_valid_study():
    spec = load_spec(ASSETS / "spec.yaml")
    Parents({p.name: p.path for p in spec.parents})
    assert Path(spec.storage.removeprefix("sqlite:///")).parent == ASSETS.resolve()
