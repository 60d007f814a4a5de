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


def test_demo_runs_end_to_end_and_refuses_foreign_folders(cli, tmp_path):
    out = tmp_path / "demo"
    code, stdout, err = cli("demo", "--out", out, "--n-trials", "4")
    assert code == 0, err
    assert "mean of the test objectives" in stdout and "exported trial" in stdout
    assert (out / "spec.yaml").is_file() and (out / "study.db").is_file()
    AutoModelForCausalLM.from_pretrained(out / "export")
    code, stdout, err = cli("report", "--storage", f"sqlite:///{out / 'study.db'}", "--json")
    report = json.loads(stdout)
    assert report["trials"]["complete"] == 4
    assert all(b["test"] for b in report["baselines"])
    assert set(report["importances"]["objectives"]) == {"clinical", "instruction"}
    page = (out / "report" / "report.html").read_text()
    assert page.count("<svg") == 4 and f"Trial <b>{report['selected']}</b>" in page
    code, _, err = cli("demo", "--out", out, "--n-trials", "3")  # again, over the first
    assert code == 0, err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = cli("demo", "--out", tmp_path / "mine")
    assert code == 2 and "not the demo's" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
