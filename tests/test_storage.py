"""The study on real PostgreSQL and MariaDB servers, with the URLs users write."""

import json
import os
import uuid

import optuna
import pytest
import sqlalchemy

from storage import normalize_url, open_storage

# The servers' URLs come from the environment (defaults: the local servers .ci/run starts).
SERVERS = {
    "postgresql": os.environ.get("MERGESEARCH_TEST_POSTGRESQL",
                                 "postgresql://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("MERGESEARCH_TEST_MARIADB", "mysql://root@127.0.0.1:3306/test"),
}


def reachable(url: str) -> bool:
    try:
        with sqlalchemy.create_engine(normalize_url(url)).connect():
            return True
    except sqlalchemy.exc.SQLAlchemyError:
        return False


@pytest.fixture(params=sorted(SERVERS))
def server_url(request):
    url = SERVERS[request.param]
    if not reachable(url):
        pytest.skip(f"{request.param} server not reachable at {url} (.ci/run starts it; "
                    f"set MERGESEARCH_TEST_{request.param.upper()} to use another)")
    return url


def test_plain_urls_get_installed_drivers():
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("mysql://u:p@h/db") == "mysql+pymysql://u:p@h/db"
    assert normalize_url("mysql+mysqldb://u@h/db") == "mysql+mysqldb://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_study_on_a_database_server(cli, write_spec, server_url):
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    try:
        code, _, err = cli("launch", write_spec(), "--storage", server_url, "--study", name,
                           "--n-trials", "4", "--no-test")
        assert code == 0, err
        code, _, err = cli("worker", "--storage", server_url, "--study", name,
                           "--n-trials", "5")
        assert code == 0, err
        code, out, err = cli("report", "--storage", server_url, "--study", name, "--json")
        report = json.loads(out)
        assert report["trials"]["complete"] == 5
        assert [b["name"] for b in report["baselines"]] == ["clinical", "instruct", "uniform"]
    finally:
        storage = open_storage(server_url)
        if name in [s.study_name for s in storage.get_all_studies()]:
            optuna.delete_study(study_name=name, storage=storage)


@pytest.fixture(params=["sqlite", *sorted(SERVERS)])
def any_storage(request, tmp_path):
    """A storage URL and study name on SQLite and on each reachable server; cleaned up."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}", "tiny"
        return
    url = SERVERS[request.param]
    if not reachable(url):
        pytest.skip(f"{request.param} server not reachable at {url} (.ci/run starts it; "
                    f"set MERGESEARCH_TEST_{request.param.upper()} to use another)")
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    yield url, name
    storage = open_storage(url)
    if name in [s.study_name for s in storage.get_all_studies()]:
        optuna.delete_study(study_name=name, storage=storage)


def _worker(url: str, name: str, n_trials: int):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-c", "from search.cli import main; main()", "worker", "--storage",
         url, "--study", name, "--n-trials", str(n_trials)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_workers_trial_is_failed_and_retried(cli, write_spec, any_storage):
    """SIGKILL a worker mid-trial: after the grace period the next worker marks its trial
    failed and runs it again; no complete trial is lost or duplicated."""
    import signal
    import time

    url, name = any_storage
    spec = write_spec(heartbeat={"interval": 1, "grace": 2, "retries": 1})
    assert cli("launch", spec, "--storage", url, "--study", name, "--n-trials", "2",
               "--no-test")[0] == 0
    storage = open_storage(url)
    killed = None
    while killed is None:  # a kill that lands between two trials leaves none running: again
        worker = _worker(url, name, 50)
        deadline = time.monotonic() + 120
        while True:
            assert worker.poll() is None and time.monotonic() < deadline, worker.stderr.read()
            study = optuna.load_study(study_name=name, storage=storage)
            # once a proposal is under way its heartbeat has started (between Optuna's ask
            # and the first beat a killed trial could never be told from a slow one)
            if any(t.params for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))):
                break
            time.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        study = optuna.load_study(study_name=name, storage=storage)
        running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        killed = running[0].number if running else None
    time.sleep(3)  # past the grace period
    before = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    code, _, err = cli("worker", "--storage", url, "--study", name, "--n-trials",
                       str(before + 2))
    assert code == 0, err
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert trials[killed].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    # the same proposal (the kill may have cut it short of some parameters)
    assert retries[0].params.items() >= trials[killed].params.items()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == before + 2


def test_three_workers_share_one_study_without_losing_or_repeating_trials(
        cli, write_spec, server_url):
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    try:
        assert cli("launch", write_spec(), "--storage", server_url, "--study", name,
                   "--n-trials", "1", "--no-test")[0] == 0
        workers = [_worker(server_url, name, 10) for _ in range(3)]
        for worker in workers:
            _, err = worker.communicate(timeout=300)
            assert worker.returncode == 0, err
        trials = optuna.load_study(study_name=name, storage=open_storage(server_url)).trials
        states = [t.state for t in trials]
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        # each worker stops once it sees 10 finished; ones already running still finish
        assert 10 <= len(complete) <= 12 and states.count(optuna.trial.TrialState.RUNNING) == 0
        assert optuna.trial.TrialState.FAIL not in states
        baselines = [t.user_attrs["baseline"] for t in complete if "baseline" in t.user_attrs]
        assert sorted(baselines) == ["clinical", "instruct", "uniform"]  # each run once
        assert len({t.number for t in trials}) == len(trials)
    finally:
        storage = open_storage(server_url)
        if name in [s.study_name for s in storage.get_all_studies()]:
            optuna.delete_study(study_name=name, storage=storage)


def test_passwords_in_storage_urls_never_reach_output(cli, write_spec, caplog):
    code, out, err = cli("report", "--storage", "postgresql://u:hunter2@127.0.0.1:1/none")
    assert code == 2 and "***" in err and "hunter2" not in out + err + caplog.text
    url = SERVERS["postgresql"]
    if not reachable(url):
        pytest.skip(f"postgresql server not reachable at {url}")
    parsed = sqlalchemy.engine.make_url(url)
    secret = parsed.set(password=parsed.password or "hunter2")  # trust auth ignores it
    with_password = secret.render_as_string(hide_password=False)
    if not reachable(with_password):
        pytest.skip("the server refuses this password")
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    try:
        outputs = [cli("launch", write_spec(), "--storage", with_password, "--study", name,
                       "--n-trials", "2", "--no-test"),
                   cli("status", "--storage", with_password, "--study", name),
                   cli("report", "--storage", with_password, "--study", name, "--json")]
        assert all(code == 0 for code, _, _ in outputs)
        text = "".join(o + e for _, o, e in outputs) + caplog.text
        assert secret.password not in text
    finally:
        storage = open_storage(url)
        if name in [s.study_name for s in storage.get_all_studies()]:
            optuna.delete_study(study_name=name, storage=storage)


def test_records_migrate_and_an_evaluation_is_written_whole_or_not_at_all(any_storage):
    from storage.records import ItemRow, RecordStore, current_revision, now

    url, name = any_storage
    store = RecordStore.open(url)
    assert current_revision(store.engine) == "0001"
    items = [ItemRow("radiology", "r1", "No acute findings.\x00 – ok", {"rougeL": 0.5}, 0.25),
             ItemRow("ifeval", "i1", "", {"strict": float("nan")}, 0.5)]
    store.record_evaluation(name, 3, "dev", "hf:cpu:float32", "complete", now(), items, "ab" * 32)
    # the last item repeats an id: the database refuses it, and nothing of the evaluation stays
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        store.record_evaluation(name, 4, "dev", "hf:cpu:float32", "complete", now(),
                                items + items[:1])
    (evaluation,) = store.evaluations(name)
    assert (evaluation.trial, evaluation.split, evaluation.outcome) == (3, "dev", "complete")
    assert evaluation.started <= evaluation.finished
    assert [(i.item_id, i.output, i.scores, i.latency_s) for i in evaluation.items] == [
        ("r1", "No acute findings.\ufffd – ok", {"rougeL": 0.5}, 0.25),  # NUL is refused
        ("i1", "", {"strict": None}, 0.5)]
    with store.engine.connect() as connection:
        orphans = connection.execute(sqlalchemy.text(
            "SELECT COUNT(*) FROM mergesearch_item_results r LEFT JOIN mergesearch_evaluations "
            "e ON r.evaluation_id = e.id WHERE e.id IS NULL")).scalar()
    assert orphans == 0
    store.record_export(name, 3, "/tmp/out", "ab" * 32, "yes")
    assert [(e.trial, e.verified) for e in store.exports(name)] == [(3, "yes")]
    RecordStore.open(url)  # opening again is a no-op at the current version


def test_record_schema_downgrades_and_upgrades(tmp_path):
    from storage.records import RecordStore, current_revision, downgrade, upgrade

    store = RecordStore.open(f"sqlite:///{tmp_path / 'study.db'}")
    downgrade(store.engine, "base")
    assert current_revision(store.engine) is None
    assert not [t for t in sqlalchemy.inspect(store.engine).get_table_names()
                if t.startswith("mergesearch_") and t != "mergesearch_alembic_version"]
    upgrade(store.engine)
    assert current_revision(store.engine) == "0001"
    assert {"mergesearch_evaluations", "mergesearch_item_results", "mergesearch_exports"} <= set(
        sqlalchemy.inspect(store.engine).get_table_names())
