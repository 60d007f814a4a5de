"""Each user mistake: one clear message naming the file and field or tensor, exit code 2,
no traceback, and no study database written."""

import pytest
import yaml

from tests.conftest import make_model, spec_dict


def assert_refused(cli, tmp_path, spec, *needles):
    code, out, err = cli("launch", spec)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "study.db").exists()
    return err


def test_unknown_field_names_file_line_and_field(cli, write_spec, tmp_path):
    spec = write_spec(merge={"method": "linear", "genez": "per_layer"})
    lines = spec.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, start=1) if "genez" in text)
    assert_refused(cli, tmp_path, spec, f"spec.yaml:{line}: merge.genez: unknown field")


def test_wrong_value_type(cli, write_spec, tmp_path):
    spec = write_spec(budget={"n_trials": "many"})
    assert_refused(cli, tmp_path, spec, "budget.n_trials", "integer")


def test_missing_parent_folder(cli, write_spec, tmp_path, parents):
    spec = write_spec(parents=[{"name": "clinical", "path": str(parents["clinical"])},
                               {"name": "instruct", "path": "models/nowhere"}])
    assert_refused(cli, tmp_path, spec, "parents[1].path", "nowhere", "does not exist")


def test_parents_of_different_shapes(cli, write_spec, tmp_path, tokenizer, parents):
    make_model(tmp_path / "wide", tokenizer, seed=4, hidden_size=48)
    spec = write_spec(parents=[{"name": "clinical", "path": str(parents["clinical"])},
                               {"name": "wide", "path": str(tmp_path / "wide")}])
    err = assert_refused(cli, tmp_path, spec, "tensor 'lm_head.weight' has shape (400, 32)",
                         "(400, 48) in 'wide'")
    assert str(tmp_path / "wide") in err


def test_unknown_probe_kind(cli, tmp_path, parents, probe_files):
    data = spec_dict(parents, probe_files)
    data["probes"][0]["kind"] = "summarize"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    assert_refused(cli, tmp_path, spec, "probes[0].kind", "unknown probe kind 'summarize'",
                   "generation", "instruction")


def test_empty_probe_file(cli, tmp_path, parents, probe_files):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    data = spec_dict(parents, {**probe_files, "radiology": empty})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    assert_refused(cli, tmp_path, spec, "probes[0] (radiology)", str(empty), "has no items")


def test_objective_naming_an_unknown_probe(cli, write_spec, tmp_path):
    spec = write_spec(objectives=[{"name": "clinical", "probes": ["radiolgy"]}])
    assert_refused(cli, tmp_path, spec, "objectives[0] names probe 'radiolgy'")


def test_invalid_yaml(cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\nparents: [\n")
    assert_refused(cli, tmp_path, spec, "spec.yaml:", "not valid YAML")


@pytest.mark.parametrize("args,needle", [
    (("launch", "missing.yaml"), "spec file missing.yaml does not exist"),
    (("report", "--storage", "nonsense"), "not a database URL"),
    (("launch", "spec.yaml", "--timeout", "soon"), "--timeout 'soon'"),
])
def test_command_line_mistakes(cli, write_spec, args, needle, monkeypatch, tmp_path):
    write_spec()
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(*args)
    assert code == 2 and needle in err, err


def test_unreachable_database(cli):
    code, _, err = cli("report", "--storage", "postgresql://nobody@127.0.0.1:1/none")
    assert code == 2 and "cannot open storage postgresql+psycopg://nobody@127.0.0.1:1/none" in err


def test_spec_density_outside_unit_interval(cli, write_spec, tmp_path, parents):
    spec = write_spec(parents=[{"name": n, "path": str(parents[n])}
                               for n in ("base", "clinical", "instruct")],
                      merge={"method": "ties", "base": "base", "params": {"density": [0.2, 1.4]}})
    assert_refused(cli, tmp_path, spec, "merge", "density = 1.4 is outside [0.0, 1.0]")


def test_spec_method_needing_a_base(cli, write_spec, tmp_path):
    spec = write_spec(merge={"method": "dare_ties"})
    assert_refused(cli, tmp_path, spec, "merge", "needs merge.base")


def test_spec_method_with_nothing_to_search(cli, write_spec, tmp_path, parents):
    spec = write_spec(parents=[{"name": n, "path": str(parents[n])}
                               for n in ("base", "clinical", "instruct")],
                      merge={"method": "model_stock", "base": "base"})
    assert_refused(cli, tmp_path, spec, "merge", "'model_stock' leaves nothing to search")


def _merge_refused(cli, tmp_path, config: dict, *needles):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = cli("merge", path, tmp_path / "out")
    assert code == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_merge_config_mistakes(cli, tmp_path, parents):
    models = [{"model": str(parents["clinical"])}, {"model": str(parents["instruct"])}]
    _merge_refused(cli, tmp_path, {"models": models, "merge_method": "ties"},
                   "needs a base model")
    _merge_refused(cli, tmp_path, {"models": models, "merge_method": "linear",
                                   "parameters": {"weight": [0.1, 0.2, 0.3, 0.4, 0.5]}},
                   "parameters.weight", "5 values", "3 layers")
    _merge_refused(cli, tmp_path, {"models": models, "merge_method": "ties",
                                   "base_model": str(parents["base"]),
                                   "parameters": {"weight": 1.0, "density": 1.5}},
                   "parameters.density", "outside [0.0, 1.0]")
    _merge_refused(cli, tmp_path, {"slices": [], "merge_method": "linear"},
                   "slices", "not supported")
    _merge_refused(cli, tmp_path, {"models": models, "merge_method": "frankenmerge"},
                   "merge_method", "unknown merge method 'frankenmerge'")
    _merge_refused(cli, tmp_path, {"models": [{"model": "nowhere"}] + models[1:],
                                   "merge_method": "linear"}, "models[0].model", "nowhere")


def test_merge_config_with_different_architectures(cli, tmp_path, tokenizer, parents):
    make_model(tmp_path / "wide", tokenizer, seed=4, hidden_size=48)
    _merge_refused(cli, tmp_path, {"models": [{"model": str(parents["clinical"])},
                                              {"model": str(tmp_path / "wide")}],
                                   "merge_method": "linear", "parameters": {"weight": 1.0}},
                   "tensor", "(400, 48)")


def test_merge_refuses_to_replace_an_input_model(cli, tmp_path, parents):
    import shutil

    copy = tmp_path / "clinical"
    shutil.copytree(parents["clinical"], copy)
    before = sorted((p.name, p.stat().st_size) for p in copy.iterdir())
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "linear", "parameters": {"weight": 1.0},
        "models": [{"model": str(copy)}, {"model": str(parents["instruct"])}]}))
    for out in (copy, tmp_path):
        code, _, err = cli("merge", config, out, "--force")
        assert code == 2 and "holds the input model" in err, err
    assert sorted((p.name, p.stat().st_size) for p in copy.iterdir()) == before
