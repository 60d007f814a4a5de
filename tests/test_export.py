"""Choosing the trial to export (best, knee, a number, a rule), the exported folder's model
card and provenance, and export's refusals."""

import hashlib
import json

import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import scored_study, spec_dict

# (clinical, instruction) of a front whose knee is the second point, then a dominated trial
FRONT = [(0.9, 0.1), (0.8, 0.6), (0.5, 0.75), (0.1, 0.9)]


@pytest.fixture
def spec(parents, probe_files):
    return spec_dict(parents, probe_files)


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'study.db'}"


def test_knee_is_the_front_member_farthest_from_the_line_joining_its_ends(spec, url):
    from search.selection import select_trial

    study = scored_study(url, spec, [*FRONT, (0.7, 0.5)])
    assert select_trial(study, "knee").number == 1
    # minimising the second objective turns the front over: its ends become the knee's rivals
    spec["objectives"][1]["direction"] = "minimize"
    flipped = scored_study(f"{url}-2", {**spec, "name": "flipped"},
                           [(0.9, 0.1), (0.8, 0.02), (0.2, 0.0), (0.6, 0.5)])
    assert select_trial(flipped, "knee").number == 1


def test_knee_ties_follow_the_documented_order_and_lead_the_test_candidates(spec, url):
    from search.selection import select_trial, top_trials

    # trials 2 and 3 both have scaled sum 1.07 and mean 0.535 (not in floats): lower number
    study = scored_study(url, spec, [(1.0, 0.0), (0.0, 1.0), (0.12, 0.95), (0.08, 0.99)])
    assert select_trial(study, "knee").number == 2
    # the knee (1) is not the member with the best mean (4): it is scored on test first
    lopsided = scored_study(f"{url}-2", {**spec, "name": "lopsided"},
                            [(0.10, 0.0), (0.08, 0.6), (0.02, 0.95), (0.01, 0.97), (0.0, 1.0)])
    assert select_trial(lopsided, "knee").number == 1
    assert [t.number for t in top_trials(lopsided, 3)] == [1, 4, 3]


def test_rules_pick_among_feasible_trials_by_dev_values(spec, url, cli, tmp_path):
    from search.selection import Rule, select_trial

    # trial 4 is best on both objectives but breaks the constraint
    study = scored_study(url, spec, [*FRONT, (0.95, 0.95)], constraints=[0, 0, 0, 0, 0.3])

    def pick(mins=(), maxes=(), maximize=None, minimize=None):
        return select_trial(study, Rule.parse(list(mins), list(maxes), maximize, minimize))

    assert pick(["instruction=0.5"], maximize="clinical").number == 1
    assert pick(["instruction=0.7"], maximize="clinical").number == 2
    assert pick(maxes=["clinical=0.6"], maximize="instruction").number == 3
    assert pick(["clinical=0.4"], minimize="clinical").number == 2
    assert pick(["clinical=0.05"]).number == 1  # no optimised objective: the knee
    assert select_trial(study, "knee").number == 1  # never the infeasible trial 4

    for args, needle in [
        (["--min", "instruction=0.95"], "no complete feasible trial has instruction >= 0.95 "
                                        "on dev (instruction: best 0.9000)"),
        (["--min", "fluency=0.5"], "objective 'fluency' is not one of this study's"),
        (["--min", "instruction>0.5"], "--min 'instruction>0.5': write OBJECTIVE=VALUE"),
        (["--maximize", "clinical", "--minimize", "instruction"], "not both"),
        (["--trial", "2", "--maximize", "clinical"], "give --trial or a rule"),
        (["--trial", "best"], "has 2 objectives, so no single best: choose knee"),
        (["--trial", "first"], "--trial 'first': give a trial number, best or knee"),
    ]:
        code, _, err = cli("export", "--storage", url, *args, tmp_path / "out")
        assert code == 2 and needle in err, (args, err)
    assert not (tmp_path / "out").exists()


def test_knee_is_refused_for_one_objective(parents, probe_files, url):
    from mergesearch.errors import MergesearchError
    from search.selection import select_trial

    one = spec_dict(parents, probe_files,
                    objectives=[{"name": "clinical", "probes": ["radiology"]}])
    study = scored_study(url, one, [(0.2,), (0.7,), (0.4,)])
    assert select_trial(study, "best").number == 1
    with pytest.raises(MergesearchError, match="has one objective"):
        select_trial(study, "knee")


def test_export_refuses_failed_pruned_and_missing_trials(spec, url, cli, tmp_path):
    scored_study(url, spec, [(0.5, 0.5)], states=[TrialState.FAIL, TrialState.PRUNED])
    out = tmp_path / "out"
    for trial, needle in [("1", "trial 1 of study 'tiny' is failed, not complete"),
                          ("2", "trial 2 of study 'tiny' is pruned, not complete"),
                          ("3", "has no trial 3 (trials 0 to 2)")]:
        code, _, err = cli("export", "--storage", url, "--trial", trial, out)
        assert code == 2 and needle in err, err
    code, _, err = cli("export", "--storage", "postgresql://nobody@127.0.0.1:1/none", out)
    assert code == 2 and "cannot open storage postgresql" in err and "Connection refused" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "study.db"]


def test_export_of_a_study_without_a_complete_trial_says_so(spec, url, cli, tmp_path):
    scored_study(url, spec, [], states=[TrialState.FAIL])
    code, _, err = cli("export", "--storage", url, tmp_path / "out")
    assert code == 2 and "study 'tiny' has no complete feasible trial yet" in err
    assert not (tmp_path / "out").exists()


def test_model_card_shows_recipe_scores_and_provenance(cli, write_spec, parents, tmp_path):
    code, _, err = cli("launch", write_spec(), "--n-trials", "4")
    assert code == 0, err
    url = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "export"
    code, stdout, err = cli("export", "--storage", url, out)
    assert code == 0, err
    record = json.loads((out / "mergesearch_recipe.json").read_text())
    card = (out / "README.md").read_text()
    report = json.loads(cli("report", "--storage", url, "--json")[1])

    assert record["trial"] == report["selected"] and "knee" in record["chosen_as"]
    assert f"trial {record['trial']}, the knee" in stdout
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["base_model"] == [str(parents["clinical"]), str(parents["instruct"])]
    # scores: the merge next to each parent and the average, dev and test
    header = next(line for line in card.splitlines() if line.startswith("| objective"))
    for column in ("clinical dev", "clinical test", "instruct dev", "uniform test",
                   f"this merge (trial {record['trial']}) test"):
        assert column in header
    assert set(record["baselines"]) == {"clinical", "instruct", "uniform"}
    assert record["baselines"]["clinical"]["test"] is not None
    # provenance: parents' file hashes, versions, ids, seed, weights hash, mergekit YAML
    weights = parents["instruct"] / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["parents"]["instruct"]["files"]["model.safetensors"] == digest
    assert f"`model.safetensors` sha256 `{digest}`" in card
    assert {"python", "mergesearch", "torch", "transformers", "optuna"} <= set(
        record["versions"])
    assert f"torch {record['versions']['torch']}" in card
    assert "Study `tiny`, trial" in card and f"study seed {record['seed']}" in card
    assert record["weights_sha256"] in card and "the same bytes as the trial scored" in card
    assert json.dumps(record["recipe"], indent=2, sort_keys=True) in card
    mergekit = (out / "mergekit_config.yml").read_text()
    assert f"```yaml\n{mergekit}```" in card
    assert (out / "generation_config.json").is_file()


def test_source_defaults_to_the_last_parent_with_a_chat_template(parents, probe_files,
                                                                 tmp_path):
    import shutil

    from search.spec import parse_spec

    plain = tmp_path / "clinical-no-template"
    shutil.copytree(parents["clinical"], plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))

    spec = spec_dict({"clinical": plain, "instruct": parents["instruct"]}, probe_files)
    spec["parents"].reverse()  # instruct first: the default is not merely the last
    assert parse_spec(spec, "test").source_parent.name == "instruct"
    both = spec_dict(parents, probe_files)
    both["parents"].reverse()
    assert parse_spec(both, "test").source_parent.name == "clinical"  # both have one: last
    both["merge"]["source"] = "instruct"
    assert parse_spec(both, "test").source_parent.name == "instruct"
