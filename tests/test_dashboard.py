"""`mergesearch dashboard` serves the study locally."""

import json
import urllib.request
import warnings

import optuna

from tests.dashboard_server import free_port, start_dashboard


def test_dashboard_serves_the_study_on_localhost(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="shown", storage=url, directions=["maximize"] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["clinical", "instruction"])
    study.add_trial(optuna.trial.create_trial(values=[0.5, 0.25]))
    # a trial with its items attached, in the default artifact folder beside the database
    from storage.artifacts import artifact_store, upload_jsonl

    trial = study.ask()
    artifact = upload_jsonl(artifact_store(tmp_path / "study.artifacts"), "dev-items.jsonl",
                            [{"item_id": "r1", "output": "No acute findings."}], trial)
    study.tell(trial, [0.75, 0.5])
    port = free_port()
    server = start_dashboard(url, port, tmp_path / "dashboard.log")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as r:
            studies = json.load(r)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["shown"]
        study_id = studies[0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}") as r:
            detail = json.load(r)
        assert detail["objective_names"] == ["clinical", "instruction"]
        assert len(detail["trials"]) == 2
        trial_id = detail["trials"][1]["trial_id"]
        with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/artifacts/{study_id}/{trial_id}/{artifact}") as r:
            assert json.loads(r.read().decode()) == {"item_id": "r1",
                                                     "output": "No acute findings."}
    finally:
        server.terminate()
        server.wait(timeout=10)
    log = (tmp_path / "dashboard.log").read_text()
    assert f"dashboard on http://127.0.0.1:{port}/" in log and "warning" not in log


def test_dashboard_serves_other_hosts_only_when_asked_and_warns(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="shown", storage=url)
    port = free_port()
    server = start_dashboard(url, port, tmp_path / "dashboard.log", "--host", "0.0.0.0")
    server.terminate()
    server.wait(timeout=10)
    log = (tmp_path / "dashboard.log").read_text()
    assert "warning: serving on 0.0.0.0: anyone who can reach it sees the study" in log
