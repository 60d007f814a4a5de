"""`mergesearch dashboard` serves the study locally."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

import optuna


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    server = subprocess.Popen(
        [sys.executable, "-c", "from search.cli import main; main()", "dashboard", "--storage",
         url, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as r:
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "dashboard did not start"
                time.sleep(0.5)
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
