"""The study end to end through the CLI, on tiny random parents."""

import json
from pathlib import Path

import optuna
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import spec_dict


@pytest.fixture
def launched(cli, write_spec, tmp_path):
    spec = write_spec()
    code, out, err = cli("launch", spec, "--n-trials", "5")
    assert code == 0, err
    return f"sqlite:///{tmp_path / 'study.db'}"


def test_launch_records_trials_baselines_and_test_values(cli, launched):
    code, out, err = cli("report", "--storage", launched, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["study"] == "tiny"
    assert report["objectives"] == ["clinical", "instruction"]
    assert report["directions"] == ["maximize", "maximize"]
    assert report["trials"]["complete"] == 5 and report["trials"]["fail"] == 0
    names = [b["name"] for b in report["baselines"]]
    assert names == ["clinical", "instruct", "uniform"]
    for baseline in report["baselines"]:
        assert set(baseline["dev"]) == {"clinical", "instruction"}
        assert set(baseline["test"]) == {"clinical", "instruction"}
    assert report["best"] and report["selected"] in [b["trial"] for b in report["best"]]
    best = report["best"][0]
    assert best["test"] is not None and best["recipe"]["method"] == "linear"
    assert len(best["weights_sha256"]) == 64


def test_trials_carry_recipe_metrics_and_metric_names(launched):
    import optuna

    study = optuna.load_study(study_name="tiny", storage=launched)
    assert study.metric_names == ["clinical", "instruction"]
    trial = study.trials[-1]
    assert set(trial.user_attrs) >= {"recipe", "weights_sha256", "weights_dtype", "dev_probes"}
    genes = set(trial.user_attrs["recipe"]["model_params"]["instruct"]["weight"])
    assert genes == {"layers.0", "layers.1", "layers.2", "embed", "norm", "lm_head"}
    assert {p for p in trial.params} == {f"t[{g}]" for g in genes}


def test_resume_and_worker_count_toward_one_budget(cli, launched):
    code, _, err = cli("launch", cli_spec_path(launched), "--n-trials", "6", "--no-test")
    assert code == 0, err
    code, _, err = cli("worker", "--storage", launched, "--n-trials", "7")
    assert code == 0, err
    code, out, _ = cli("report", "--storage", launched, "--json")
    assert json.loads(out)["trials"]["complete"] == 7
    code, out, _ = cli("status", "--storage", launched)
    assert code == 0 and out.count("complete") == 7 and "uniform" in out
    import optuna

    trials = optuna.load_study(study_name="tiny", storage=launched).trials
    sampled = [tuple(sorted(t.params.items())) for t in trials if "baseline" not in t.user_attrs]
    assert len(set(sampled)) == len(sampled), "a resumed run replayed earlier proposals"


def cli_spec_path(storage_url: str) -> str:
    return storage_url.removeprefix("sqlite:///").replace("study.db", "spec.yaml")


def test_export_best_loads_and_generates(cli, launched, tmp_path):
    out_dir = tmp_path / "export"
    code, out, err = cli("export", "--storage", launched, out_dir)
    assert code == 0, err
    record = json.loads((out_dir / "mergesearch_recipe.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert tokenizer.chat_template
    ids = tokenizer("The lungs are clear.", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    assert "weights sha256" in (out_dir / "README.md").read_text().lower()
    assert record["weights_verified"] is True and record["weights_device"] == "cpu"
    assert record["trial"] == json.loads(cli("report", "--storage", launched, "--json")[1])[
        "selected"]
    from storage.records import RecordStore

    (row,) = RecordStore.open(launched).exports("tiny")
    assert (row.trial, row.path, row.weights_sha256, row.verified) == (
        record["trial"], str(out_dir.resolve()), record["weights_sha256"], "yes")


def test_export_refuses_what_it_cannot_do_cleanly(cli, launched, tmp_path):
    out_dir = tmp_path / "export"
    out_dir.mkdir()
    code, _, err = cli("export", "--storage", launched, out_dir)
    assert code == 2 and "already exists" in err
    code, _, err = cli("export", "--storage", launched, "--trial", "99", tmp_path / "x")
    assert code == 2 and "no trial 99" in err and not (tmp_path / "x").exists()
    code, _, err = cli("export", "--storage", "sqlite:///" + str(tmp_path / "none.db"),
                       tmp_path / "y")
    assert code == 2 and "no study database" in err
    code, _, err = cli("export", "--storage", launched, "--device", "floppy", tmp_path / "z")
    assert code == 2 and "--device 'floppy' is not a device" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_export_detects_changed_parents(cli, write_spec, parents, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    copies = {}
    for name in ("clinical", "instruct"):
        copies[name] = tmp_path / "parents" / name
        shutil.copytree(parents[name], copies[name])
    spec = write_spec(parents=[{"name": n, "path": str(p)} for n, p in copies.items()])
    assert cli("launch", spec, "--n-trials", "3", "--no-test")[0] == 0
    weights = copies["clinical"] / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + torch.ones(1)
    save_file(tensors, weights, metadata={"format": "pt"})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, _, err = cli("export", "--storage", storage, "--trial", "2", tmp_path / "bad")
    assert code == 2 and "not the ones the study used" in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bad")] == []
    assert not (tmp_path / "bad").exists()


def test_evaluate_scores_a_model_and_writes_items(cli, write_spec, parents, tmp_path):
    items = tmp_path / "items.jsonl"
    code, out, err = cli("evaluate", write_spec(), "--model", parents["instruct"], "--split",
                         "test", "--json", "--items", items)
    assert code == 0, err
    result = json.loads(out)
    assert set(result["objectives"]) == {"clinical", "instruction"}
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    assert len(rows) == 8 and {r["split"] for r in rows} == {"test"}
    assert {"probe", "item_id", "output", "scores"} <= set(rows[0])


def test_ctrl_c_stops_cleanly_and_the_study_resumes(cli, write_spec, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import optuna

    spec = write_spec(budget={"n_trials": 500})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    launch = subprocess.Popen(
        [sys.executable, "-c", "from search.cli import main; main()", "launch", str(spec),
         "--no-test"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert launch.poll() is None and time.monotonic() < deadline
        try:
            done = optuna.load_study(study_name="tiny", storage=storage).get_trials(
                states=(optuna.trial.TrialState.COMPLETE,))
            if len(done) >= 4:
                break
        except KeyError:
            pass
        time.sleep(0.2)
    launch.send_signal(signal.SIGINT)
    _, err = launch.communicate(timeout=60)
    assert launch.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    study = optuna.load_study(study_name="tiny", storage=storage)
    finished = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    assert cli("launch", spec, "--n-trials", str(finished + 2), "--no-test")[0] == 0
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == finished + 2


def test_space_searches_any_parameter_per_module_and_outer_gene(parents, probe_files):
    from merging.layout import ModelLayout
    from search.space import SearchSpace
    from search.spec import StudySpec

    data = spec_dict(parents, probe_files)
    data["parents"] = [{"name": n, "path": str(parents[n])} for n in ("base", "clinical",
                                                                      "instruct")]
    data["merge"] = {"method": "ties", "base": "base", "genes": "per_module",
                     "params": {"density": [0.2, 1.0], "lambda": {"low": 0.5, "high": 1.5,
                                                                   "genes": "global"}}}
    spec = StudySpec.model_validate(data)
    names = [f"model.layers.{i}.{m}" for i in range(3) for m in
             ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")]
    layout = ModelLayout.from_names(names + ["model.embed_tokens.weight", "model.norm.weight",
                                             "lm_head.weight"], 3)
    space = SearchSpace(spec, layout)
    dims = {d.name for d in space.dimensions}
    assert "density[instruct][layers.1.attn]" in dims and "weight[clinical][lm_head]" in dims
    assert "density[clinical][layers.2]" in dims and "lambda[*]" in dims
    # lambda is global inside the layers, with embed, norm and lm_head values of their own
    assert len(dims) == 2 * 2 * (9 + 3) + 4
    study = optuna.create_study()
    recipe = space.suggest(study.ask())
    assert recipe.base == "base" and recipe.models == ("clinical", "instruct")
    assert set(recipe.model_params["instruct"]["density"]) >= {"layers.0.mlp", "embed"}
    baselines = space.baselines()
    assert set(baselines) == {"base", "clinical", "instruct", "uniform"}
    assert baselines["clinical"]["density[instruct][layers.0.mlp]"] == 1.0


def test_task_vector_study_end_to_end_with_mergekit_export(cli, write_spec, parents, tmp_path):
    """A dare_ties study over base + two fine-tunes, density searched per module: baselines
    include the base, random masks reproduce at export, and export writes the mergekit
    config that mergekit would run."""
    import yaml

    spec = write_spec(
        parents=[{"name": n, "path": str(parents[n])} for n in ("base", "clinical", "instruct")],
        merge={"method": "dare_ties", "base": "base", "genes": "per_module",
               "params": {"density": [0.3, 1.0]}})
    code, _, err = cli("launch", spec, "--n-trials", "6", "--no-test")
    assert code == 0, err
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    report = json.loads(cli("report", "--storage", storage, "--json")[1])
    assert [b["name"] for b in report["baselines"]] == ["base", "clinical", "instruct",
                                                        "uniform"]
    code, _, err = cli("export", "--storage", storage, "--trial", "5", tmp_path / "out")
    assert code == 0, err  # the export re-draws the masks and matches the recorded hash
    config = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    assert config["merge_method"] == "dare_ties" and config["base_model"] == str(parents["base"])
    densities = config["models"][0]["parameters"]["density"]
    assert any(isinstance(c.get("value"), list) for c in densities)  # per-layer gradients


def _layout(num_layers=5):
    from merging.layout import ModelLayout

    names = [f"model.layers.{i}.{m}" for i in range(num_layers) for m in
             ("self_attn.q_proj.weight", "mlp.up_proj.weight")]
    return ModelLayout.from_names(names + ["model.embed_tokens.weight", "model.norm.weight",
                                           "lm_head.weight"], num_layers)


def test_anchor_genes_interpolate_across_depth_with_bounds_per_gene(parents, probe_files):
    from search.space import SearchSpace
    from search.spec import StudySpec

    data = spec_dict(parents, probe_files)
    data["merge"] = {"method": "linear", "genes": "anchors", "anchors": 3,
                     "gene_bounds": {"embed": [0.0, 0.6], "anchor.2": [0.5, 1.0]}}
    space = SearchSpace(StudySpec.model_validate(data), _layout(5))
    dims = {d.name: (d.low, d.high) for d in space.dimensions}
    assert set(dims) == {"t[anchor.0]", "t[anchor.1]", "t[anchor.2]", "t[embed]", "t[norm]",
                         "t[lm_head]"}
    assert dims["t[embed]"] == (0.0, 0.6) and dims["t[anchor.2]"] == (0.5, 1.0)
    assert dims["t[anchor.0]"] == (0.0, 1.0)
    recipe = space.recipe({"t[anchor.0]": 0.0, "t[anchor.1]": 0.4, "t[anchor.2]": 1.0,
                           "t[embed]": 0.1, "t[norm]": 0.5, "t[lm_head]": 0.5})
    weights = recipe.model_params["instruct"]["weight"]
    # 5 layers at depths 0, .25, .5, .75, 1 over anchors at 0, .5, 1
    assert [weights[f"layers.{i}"] for i in range(5)] == pytest.approx([0.0, 0.2, 0.4, 0.7, 1.0])
    assert weights["embed"] == 0.1 and "anchor.0" not in weights
    assert set(space.baselines()) == {"uniform"}  # t = 0 and 1 fall outside anchor.2, embed
    data["merge"]["gene_bounds"] = {"layers.9": [0.0, 0.5]}
    with pytest.raises(Exception, match=r"merge.gene_bounds.layers.9: not a gene"):
        SearchSpace(StudySpec.model_validate(data), _layout(5))


def test_several_methods_are_one_categorical_with_conditional_parameters(
        cli, write_spec, parents, tmp_path):
    """linear or ties, chosen per trial: each trial suggests only its method's parameters,
    linear merges the two fine-tunes without the base, ties merges against the base with its
    own density range, and every baseline is enqueued once."""
    spec = write_spec(
        parents=[{"name": n, "path": str(parents[n])} for n in ("base", "clinical", "instruct")],
        merge={"method": ["linear", "ties"], "base": "base", "genes": "global",
               "outer_genes": False, "params": {"ties.density": [0.3, 0.9]}},
        sampler={"name": "random"})
    code, _, err = cli("launch", spec, "--n-trials", "10", "--no-test")
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 10
    params = {"linear": {"method", "linear.t[*]"},
              "ties": {"method", "ties.weight[clinical][*]", "ties.weight[instruct][*]",
                       "ties.density[clinical][*]", "ties.density[instruct][*]"}}
    for t in trials:
        method = t.params["method"]
        recipe = t.user_attrs["recipe"]
        assert set(t.params) == params[method] and recipe["method"] == method
        assert recipe["base"] == ("base" if method == "ties" else None)
        if method == "ties":
            assert 0.3 <= t.params["ties.density[clinical][*]"] <= 0.9
    assert {t.params["method"] for t in trials} == {"linear", "ties"}
    baselines = {t.user_attrs["baseline"]: t.params["method"] for t in trials
                 if "baseline" in t.user_attrs}
    # the base alone only ties can give (weights 0); linear, listed first, gives the rest
    assert baselines == {"base": "ties", "clinical": "linear", "instruct": "linear",
                         "uniform": "linear"}
    import torch

    from merging import Materializer, MergeRecipe, Parents

    held = Parents({n: parents[n] for n in ("base", "clinical", "instruct")})
    base_trial = next(t for t in trials if t.user_attrs.get("baseline") == "base")
    recipe = MergeRecipe.from_dict(base_trial.user_attrs["recipe"])
    for name, merged in Materializer(held).tensors(recipe, torch.float32):
        assert torch.equal(merged, held.tensor("base", name)), name


def test_several_methods_refuse_what_they_cannot_search(cli, write_spec, parents, tmp_path):
    three = [{"name": n, "path": str(parents[n])} for n in ("base", "clinical", "instruct")]
    cases = [({"method": ["linear", "ties"], "base": "base", "params": {"dare.density": 0.5}},
              "params.dare.density: 'dare' is not a listed method"),
             ({"method": ["linear", "slerp"], "base": "base", "params": {"density": 0.5}},
              "params.density: none of the methods (linear, slerp) has a parameter 'density'"),
             ({"method": ["linear", "linear"]}, "method: a method is listed twice"),
             ({"method": ["linear", "ties"]}, "method 'ties' needs merge.base")]
    for merge, needle in cases:
        code, _, err = cli("launch", write_spec(parents=three, merge=merge), "--n-trials", "1")
        assert code == 2 and needle in err, (merge, err)
    code, _, err = cli("launch", write_spec(parents=three, sampler={"name": "grid"}, merge={
        "method": ["linear", "ties"], "base": "base"}), "--n-trials", "1")
    assert code == 2 and "sampler grid searches one method" in err


def test_weighted_study_with_a_constraint_relative_to_a_parent(cli, write_spec, tmp_path):
    """One weighted objective; trials whose instruction score falls below 0.9 of the
    instruct parent's are infeasible and never reported as best."""
    spec = write_spec(
        objectives=[{"name": "clinical", "probes": ["radiology"], "weight": 3.0},
                    {"name": "instruction", "probes": ["ifeval"], "weight": 1.0}],
        combine="weighted", sampler={"name": "gp", "n_startup_trials": 2},
        constraints=[{"objective": "instruction", "at_least": 0.9, "of_parent": "instruct"}])
    code, _, err = cli("launch", spec, "--n-trials", "6", "--no-test")
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.metric_names == ["weighted"] and len(study.directions) == 1
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 6
    instruct = next(t for t in trials if t.user_attrs.get("baseline") == "instruct")
    bound = 0.9 * instruct.user_attrs["objectives"]["instruction"]
    for t in trials:
        objectives = t.user_attrs["objectives"]
        assert t.values[0] == pytest.approx((3 * objectives["clinical"]
                                             + objectives["instruction"]) / 4)
        assert t.user_attrs["constraints"] == [pytest.approx(bound - objectives["instruction"])]
    code, out, _ = cli("report", "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--json")
    best = json.loads(out)["best"][0]
    assert best["constraints"][0] <= 0
    feasible = [t for t in trials if t.user_attrs["constraints"][0] <= 0]
    assert best["trial"] == max(feasible, key=lambda t: (t.values[0], -t.number)).number


@pytest.mark.parametrize("sampler", [{"name": "cmaes", "n_startup_trials": 1},
                                     {"name": "grid", "grid_points": 2},
                                     {"name": "random"}, {"name": "nsga2"}])
def test_every_sampler_runs_a_study(cli, write_spec, tmp_path, sampler):
    changes = {"sampler": sampler, "merge": {"method": "linear", "genes": "global",
                                             "outer_genes": False}}
    if sampler["name"] == "cmaes":
        changes["combine"] = "weighted"
    code, _, err = cli("launch", write_spec(**changes), "--n-trials", "5", "--no-test")
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 5
    if sampler["name"] == "grid":  # one dimension, t[*], at 0 and 1: the parents
        assert {t.params["t[*]"] for t in complete} <= {0.0, 0.5, 1.0}


def test_single_objective_samplers_refuse_a_pareto_study(cli, write_spec, tmp_path):
    code, _, err = cli("launch", write_spec(sampler={"name": "cmaes"}), "--n-trials", "2")
    assert code == 2 and "sampler 'cmaes' optimises one objective" in err


def test_warm_start_recipes_from_mergekit_and_an_export_are_tried_first(
        cli, write_spec, parents, tmp_path):
    import yaml

    config = tmp_path / "gradient.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(parents["clinical"]),
                    "parameters": {"weight": [0.8, 0.2]}},
                   {"model": str(parents["instruct"]),
                    "parameters": {"weight": [0.2, 0.8]}}]}))
    exported = tmp_path / "mergesearch_recipe.json"
    exported.write_text(json.dumps({"recipe": {
        "method": "linear", "models": ["clinical", "instruct"],
        "model_params": {"clinical": {"weight": 0.3}, "instruct": {"weight": 0.7}}}}))
    spec = write_spec(merge={"method": "linear", "warm_start": [str(config), str(exported)]})
    code, _, err = cli("launch", spec, "--n-trials", "5", "--no-test")
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    warm = {t.user_attrs["baseline"]: t for t in study.trials
            if t.user_attrs.get("baseline", "").startswith("warm:")}
    assert set(warm) == {"warm:gradient", "warm:mergesearch_recipe"}
    gradient = warm["warm:gradient"].params
    # mergekit's gradient over 3 layers; embed, norm and lm_head at its start (t = 0)
    assert [gradient[f"t[layers.{i}]"] for i in range(3)] == pytest.approx([0.2, 0.5, 0.8])
    assert gradient["t[embed]"] == pytest.approx(0.2)
    assert list(warm["warm:mergesearch_recipe"].params.values()) == pytest.approx([0.7] * 6)


def test_warm_start_outside_the_space_is_refused(cli, write_spec, tmp_path):
    exported = tmp_path / "r.json"
    exported.write_text(json.dumps({"method": "linear", "models": ["clinical", "instruct"],
                                    "model_params": {"clinical": {"weight": 0.9},
                                                     "instruct": {"weight": 0.1}}}))
    spec = write_spec(merge={"method": "linear", "warm_start": [str(exported)],
                             "gene_bounds": {"embed": [0.5, 1.0]}})
    code, _, err = cli("launch", spec, "--n-trials", "2")
    assert code == 2 and "t[embed] = 0.1 is outside the space's [0.5, 1]" in err, err
    assert not (tmp_path / "study.db").exists()


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(
        cli, write_spec, parents, tmp_path):
    """DELLA with epsilon 0.2 cannot merge at density <= 0.2 or >= 0.8: such proposals
    fail in the merger, are recorded as failed with the reason, and others complete."""
    spec = write_spec(
        parents=[{"name": n, "path": str(parents[n])} for n in ("base", "clinical", "instruct")],
        merge={"method": "della", "base": "base", "genes": "global", "outer_genes": False,
               "params": {"density": [0.05, 0.95], "epsilon": 0.2}},
        sampler={"name": "random"})
    code, out, err = cli("launch", spec, "--n-trials", "6", "--no-test")
    assert code == 0, err
    code, out, _ = cli("report", "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--json")
    report = json.loads(out)
    assert report["trials"]["complete"] == 6 and report["trials"]["fail"] >= 1
    assert all("epsilon = 0.2 with density" in f["reason"] for f in report["failures"]["trials"])
    from storage.records import RecordStore

    failed = [e for e in RecordStore.open(f"sqlite:///{tmp_path / 'study.db'}")
              .evaluations("tiny") if e.outcome == "failed"]
    assert len(failed) == report["trials"]["fail"]
    assert all("epsilon = 0.2 with density" in e.error and not e.items for e in failed)


def test_wilcoxon_pruning_stops_worse_trials_between_chunks(cli, write_spec, tmp_path):
    import random

    from search.demo import synthetic
    from tests.conftest import write_jsonl

    rng = random.Random(1)
    items = write_jsonl(tmp_path / "radiology.jsonl",
                        [{"id": f"r{i}", **synthetic.radiology_item(rng), "split": "dev"}
                         for i in range(48)] + [{"id": "t0", **synthetic.radiology_item(rng),
                                                 "split": "test"}])
    demo = Path(__file__).parents[1] / "search/demo/assets/models"  # trained: scores differ
    spec = write_spec(
        parents=[{"name": n, "path": str(demo / n)} for n in ("clinical", "instruct")],
        probes=[{"name": "radiology", "kind": "generation", "path": str(items),
                 "fields": {"input": "findings", "reference": "impression"},
                 "template": synthetic.RADIOLOGY_PROMPT.replace("{findings}", "{{ findings }}"),
                 "max_new_tokens": 24}],
        objectives=[{"name": "clinical", "probes": ["radiology"], "metric": "rouge1"}],
        merge={"method": "linear", "genes": "global", "outer_genes": False},
        sampler={"name": "random"},
        evaluation={"chunk_size": 8, "test_top_k": 0,
                    "pruning": {"enabled": True, "p_threshold": 0.3, "min_items": 8}})
    code, _, err = cli("launch", spec, "--n-trials", "10", "--no-test")
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    pruned = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert pruned and len(pruned) + len(complete) == 10
    assert all(t.user_attrs["items_evaluated"] == 48 for t in complete)
    # every item of a complete trial is there for later trials to be compared with
    assert all(len(t.intermediate_values) == 48 for t in complete)
    assert not [t for t in pruned if "baseline" in t.user_attrs]  # references run whole
    assert all(8 <= t.user_attrs["items_evaluated"] < 48 for t in pruned)
    code, out, _ = cli("report", "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--json")
    savings = json.loads(out)["pruning"]
    assert savings["pruned"] == len(pruned)
    assert savings["items_saved"] == sum(48 - t.user_attrs["items_evaluated"] for t in pruned)
    # never pruned: the best trial is complete and better than every pruned trial's items
    assert study.best_trial.state == optuna.trial.TrialState.COMPLETE
    from storage.records import RecordStore

    recorded = {e.trial: e for e in RecordStore.open(f"sqlite:///{tmp_path / 'study.db'}")
                .evaluations("tiny")}
    for t in pruned + complete:
        outcome = "pruned" if t in pruned else "complete"
        assert recorded[t.number].outcome == outcome
        assert len(recorded[t.number].items) == t.user_attrs["items_evaluated"]


def test_a_pareto_trial_stops_only_when_a_front_member_beats_it_on_every_objective(
        parents, probe_files, tmp_path):
    """The dominance check on real storage and records: a candidate whose items are worse
    than a front member's on both objectives is stopped (and names the member); one that is
    worse on one objective and as good on the other is not, nor one with too few items;
    with a margin, a tie on one objective no longer saves it, but being better there does."""
    import random

    from evaluators.suite import ItemResult
    from search.item_pruning import PRUNED_BY_ATTR, DominatedByFront
    from search.spec import StudySpec
    from storage.records import RecordStore, now

    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = StudySpec.model_validate(spec_dict(parents, probe_files))
    records = RecordStore.open(url)
    study = optuna.create_study(study_name="tiny", storage=url, directions=["maximize"] * 2)
    rng = random.Random(0)
    member = [ItemResult(probe, f"{probe}{i}", "dev", "", "", {metric: rng.uniform(0.5, 1)},
                         0.1)
              for probe, metric in (("radiology", "rougeL"), ("ifeval", "inst_level_loose"))
              for i in range(20)]
    trial = study.ask()
    records.record_evaluation("tiny", trial.number, "dev", "hf", "complete", now(), member)
    study.tell(trial, [0.75, 0.75])
    stop = DominatedByFront(spec, {"radiology": "rougeL"}, records, p_threshold=0.05)

    def candidate(radiology_shift: float, ifeval_shift: float, count: int = 20):
        shifts, noise = {"radiology": radiology_shift, "ifeval": ifeval_shift}, random.Random(1)
        return [ItemResult(i.probe, i.item_id, "dev", "", "", {
            k: v + shifts[i.probe] + noise.gauss(0, 0.02) for k, v in i.scores.items()}, 0.1)
                for i in member if int(i.item_id.removeprefix(i.probe)) < count]

    running = study.ask()
    assert stop.check(running, candidate(-0.1, 0.0)) is None
    assert stop.check(running, candidate(-0.1, -0.1, count=5)) is None  # 5 pairs: no evidence
    assert stop.check(running, candidate(-0.1, -0.05)) == (
        f"trial {trial.number} of the Pareto front dominates it")
    assert study.trials[running.number].user_attrs[PRUNED_BY_ATTR] == trial.number
    lenient = DominatedByFront(spec, {"radiology": "rougeL"}, records, 0.05, margin=0.02)
    assert lenient.check(running, candidate(-0.1, 0.0)) is not None
    assert lenient.check(running, candidate(-0.1, 0.05)) is None


def test_evaluate_scores_chosen_trials_of_a_study_on_test(cli, write_spec, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert cli("launch", write_spec(), "--n-trials", "4", "--no-test")[0] == 0
    code, out, err = cli("evaluate", "--storage", storage, "--split", "test", "--trials",
                         "pareto", "--json")
    assert code == 0, err
    pareto = json.loads(out)
    report = json.loads(cli("report", "--storage", storage, "--json")[1])
    assert [int(n) for n in pareto] == [b["trial"] for b in report["best"]]
    assert all(set(e["test"]) == {"clinical", "instruction"} for e in pareto.values())
    assert all(b["test"] == pareto[str(b["trial"])]["test"] for b in report["best"])
    code, out, err = cli("evaluate", "--storage", storage, "--split", "test", "--trials",
                         "0,2", "--json")
    assert code == 0 and sorted(json.loads(out)) == ["0", "2"], err
    for args, needle in [(("--trials", "x"), "give best, pareto, or trial numbers"),
                         (("--trials", "9"), "no trial 9"), ((), "use --split test")]:
        split = () if needle == "use --split test" else ("--split", "test")
        code, _, err = cli("evaluate", "--storage", storage, *split, *args)
        assert code == 2 and needle in err, err


def test_every_evaluation_is_recorded_with_its_items_and_attached_for_the_dashboard(
        launched, tmp_path):
    from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

    from storage import open_storage
    from storage.records import RecordStore

    storage = open_storage(launched)
    study = optuna.load_study(study_name="tiny", storage=storage)
    records = RecordStore.open(launched)
    store = FileSystemArtifactStore(str(tmp_path / "study.artifacts"))
    dev = records.evaluations("tiny", split="dev")
    assert sorted(e.trial for e in dev) == [t.number for t in study.trials]
    for evaluation in dev:
        trial = study.trials[evaluation.trial]
        assert evaluation.outcome == "complete" and evaluation.engine == "hf:cpu:float32"
        assert evaluation.weights_sha256 == trial.user_attrs["weights_sha256"]
        assert len(evaluation.items) == trial.user_attrs["items_evaluated"] > 0
        (meta,) = get_all_artifact_meta(trial, storage=storage)
        assert meta.filename == "dev-items.jsonl"
        download_artifact(artifact_store=store, artifact_id=meta.artifact_id,
                          file_path=str(tmp_path / f"{trial.number}.jsonl"))
        lines = [json.loads(x) for x in (tmp_path / f"{trial.number}.jsonl").read_text()
                 .splitlines()]
        assert [(x["probe"], x["item_id"], x["output"]) for x in lines] == [
            (i.probe, i.item_id, i.output) for i in evaluation.items]
    tested = {e.trial for e in records.evaluations("tiny", split="test")}
    assert tested == {int(k.split(":")[1]) for k in study.user_attrs if k.startswith("test:")}
    names = {m.filename for m in get_all_artifact_meta(study)}
    assert names == {f"trial-{n}-test-items.jsonl" for n in tested}
