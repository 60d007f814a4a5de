"""The demo study under every parameterisation, several methods, each sampler, with its
constraint and item pruning: the shipped spec with one section changed at a time, on the
demo's trained models and a slice of its probe items (so that each variant takes seconds)."""

import json
from pathlib import Path

import optuna
import pytest
import yaml

from search.demo.build import ASSETS

BASE = {"name": "base", "path": str(ASSETS / "models/base")}
VARIANTS = {
    "as-shipped": {},
    "per_layer_module": {"merge": {"genes": "per_layer_module"}},
    "anchors": {"merge": {"genes": "anchors", "anchors": 3, "outer_genes": False}},
    "global-gene-bounds": {"merge": {"genes": "global", "gene_bounds": {"lm_head": [0.2, 0.8]}}},
    "several-methods": {"parents": "+base", "merge": {
        "method": ["linear", "ties", "dare_ties"], "base": "base", "genes": "global",
        "params": {"density": [0.3, 1.0], "dare_ties.density": [0.2, 0.6]}}},
    "gp": {"sampler": {"name": "gp", "n_startup_trials": 1}},
    "cmaes-weighted": {"sampler": {"name": "cmaes", "n_startup_trials": 1},
                        "combine": "weighted", "constraints": []},
    "nsga2": {"sampler": {"name": "nsga2"}},
    "random": {"sampler": {"name": "random"}},
    "grid": {"sampler": {"name": "grid", "grid_points": 2}, "merge": {"genes": "global"}},
    "weighted-wilcoxon-pruning": {"combine": "weighted"},
}
EXPECTED_PARAM = {"per_layer_module": "t[layers.0.attn]", "anchors": "t[anchor.2]",
                  "global-gene-bounds": "t[lm_head]", "several-methods": "method"}


def _slice(source: Path, dest: Path, per_split: int) -> None:
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    kept = [r for s in ("dev", "test") for r in rows if r["split"] == s][:per_split] + [
        r for r in rows if r["split"] == "test"][:2]
    dest.write_text("".join(json.dumps(r) + "\n" for r in kept))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_demo_study_runs_with(variant, cli, tmp_path):
    spec = yaml.safe_load((ASSETS / "spec.yaml").read_text())
    for parent in spec["parents"]:
        parent["path"] = str(ASSETS / parent["path"])
    for probe in spec["probes"]:
        _slice(ASSETS / probe["path"], tmp_path / Path(probe["path"]).name, 12)
        probe["path"] = str(tmp_path / Path(probe["path"]).name)
        probe["max_new_tokens"] = 24
    for key, change in VARIANTS[variant].items():
        if change == "+base":
            spec["parents"].insert(0, BASE)
        elif isinstance(change, dict):
            spec[key] = {**spec.get(key, {}), **change}
        else:
            spec[key] = change
    spec["evaluation"] = {**spec["evaluation"], "chunk_size": 4}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    code, _, err = cli("launch", tmp_path / "spec.yaml", "--n-trials", "6", "--no-test")
    assert code == 0, err
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{tmp_path / 'study.db'}")
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.FAIL not in states
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 6
    code, out, err = cli("status", "--storage", f"sqlite:///{tmp_path / 'study.db'}")
    assert code == 0 and out.count("\n") > 6, err
    if spec.get("constraints"):
        assert all("constraints" in t.user_attrs for t in finished
                   if t.state == optuna.trial.TrialState.COMPLETE)
    if variant in EXPECTED_PARAM:
        assert any(EXPECTED_PARAM[variant] in t.params for t in finished)
    if variant == "several-methods":
        assert {t.params["method"] for t in finished} <= {"linear", "ties", "dare_ties"}
