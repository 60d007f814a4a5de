"""The study on real PostgreSQL and MariaDB servers, with the URLs users write."""

import json
import uuid

import optuna
import pytest
import sqlalchemy

from storage import normalize_url, open_storage

SERVERS = {
    "postgresql": "postgresql://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql://root@127.0.0.1:3306/test",
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
        pytest.skip(f"{request.param} server not reachable at {url} (.ci/run starts it)")
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
