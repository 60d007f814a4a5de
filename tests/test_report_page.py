"""`mergesearch report --out DIR`: a self-contained HTML page drawn from the report dict."""

import json
import re

import pytest
from optuna.trial import TrialState, create_trial

from search.report import weight_profiles
from tests.conftest import scored_study, spec_dict

FIGURES = ["Pareto front", "Per-layer weight profile", "Optimisation history",
           "Parameter importances"]


def external_references(html: str) -> list[str]:
    """Anything the page would fetch: src/href to another document, stylesheets, scripts."""
    return re.findall(r"""(?:src|href)\s*=\s*["'](?!#)[^"']+|<link\b|<script\b|@import""",
                      html)


def test_report_page_of_a_launched_study(cli, write_spec, tmp_path):
    code, _, err = cli("launch", write_spec(), "--n-trials", "5")
    assert code == 0, err
    url = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "report"
    code, stdout, err = cli("report", "--storage", url, "--out", out, "--json")
    assert code == 0, err
    assert stdout.split() == ["wrote", str(out / "report.html"), "wrote",
                              str(out / "report.json")]
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(cli("report", "--storage", url, "--json")[1])

    html = (out / "report.html").read_text()
    assert external_references(html) == []
    for title in FIGURES:
        assert f"<h2>{title}</h2>" in html
    # the front, the profile and the history are drawn; importances need varied scores
    assert html.count("<svg") >= 3
    assert f"Trial <b>{report['selected']}</b>, the knee of the feasible Pareto front" in html
    assert "parent clinical" in html and "uniform average" in html
    profiles = report["profiles"]
    assert profiles["layers"] == 3
    assert [s["trial"] for s in profiles["series"]][0] == report["selected"]
    assert {s["line"] for s in profiles["series"]} == {"instruct weight"}  # 1 - it: clinical
    assert [h["trial"] for h in report["history"]] == list(range(5))
    found = report["importances"]
    assert set(found["objectives"]) | set(found["not_computed"]) == {"clinical", "instruction"}
    genes = ("layers.0", "layers.1", "layers.2", "embed", "norm", "lm_head")
    for ranked in found["objectives"].values():
        assert set(ranked) == {f"t[{g}]" for g in genes}


def test_report_page_without_front_profiles_or_importances(parents, probe_files, tmp_path,
                                                           cli):
    one = spec_dict(parents, probe_files,
                    objectives=[{"name": "clinical", "probes": ["radiology"]}])
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = scored_study(url, one, [(0.2,), (0.6,)], states=[TrialState.FAIL])
    study.add_trial(create_trial(state=TrialState.PRUNED,
                                 user_attrs={"prune_reason": "its items score below the "
                                                             "best trial's"}))
    code, _, err = cli("report", "--storage", url, "--out", tmp_path / "r")
    assert code == 0, err
    html = (tmp_path / "r" / "report.html").read_text()
    assert "One objective: no front to draw." in html
    assert "The search space has no per-layer genes." in html
    assert "Not computed: clinical: 2 complete trials; importances need at least 3" in html
    assert "Trial <b>1</b>, the feasible trial with the best dev value" in html
    assert "its items score below the best trial&#39;s" in html  # escaped
    assert "not recorded (the worker stopped" in html


def test_report_out_must_be_a_folder(parents, probe_files, tmp_path, cli):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    scored_study(url, spec_dict(parents, probe_files), [(0.2, 0.3)])
    (tmp_path / "taken").write_text("mine")
    code, _, err = cli("report", "--storage", url, "--out", tmp_path / "taken")
    assert code == 2 and "--out" in err and "is a file, not a folder" in err
    assert (tmp_path / "taken").read_text() == "mine"


def _trial(model_params: dict, params: dict | None = None):
    recipe = {"method": "linear", "models": list(model_params), "model_params": model_params,
              "params": params or {}}
    return create_trial(values=[0.0], user_attrs={"recipe": recipe})


@pytest.mark.parametrize("model_params, params, expected", [
    # two weights summing to 1 everywhere: only the second is drawn
    ({"a": {"weight": {"layers.0": 0.25, "layers.1": 0.5}},
      "b": {"weight": {"layers.0": 0.75, "layers.1": 0.5}}}, {},
     {"b weight": [0.75, 0.5]}),
    # split by module: a layer's value is the mean of its attention and MLP genes (the bare
    # layer gene covers its norms only); a gene missing from one layer falls back to `*`
    ({"a": {"weight": {"layers.0": 0.9, "layers.0.attn": 0.2, "layers.0.mlp": 0.4,
                       "layers.1.attn": 1.0}},
      "b": {"weight": {"layers.1": 0.0, "*": 0.5}}}, {},
     {"a weight": [pytest.approx(0.3), 1.0], "b weight": [0.5, 0.0]}),
    # slerp's t is recipe-wide
    ({}, {"t": {"layers.0": 0.1, "layers.1": 0.9}}, {"t": [0.1, 0.9]}),
])
def test_weight_profiles(model_params, params, expected):
    profile = weight_profiles([_trial(model_params, params)])
    assert profile["layers"] == 2
    assert {s["line"]: s["values"] for s in profile["series"]} == expected
