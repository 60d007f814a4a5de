"""Opening the SQL store from the URLs users write.

`postgresql://` and `mysql://` URLs are mapped to the drivers the project installs
(psycopg 3 and PyMySQL); a URL that names its driver is left alone. A store that cannot be
reached raises `StorageError` with the URL (password hidden) and the driver's reason.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from mergesearch.errors import StorageError

log = logging.getLogger(__name__)

_DEFAULT_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
                    "mysql": "mysql+pymysql", "mariadb": "mysql+pymysql"}


def normalize_url(url: str) -> str:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"storage URL {url!r} is not a database URL; write it like "
                           "sqlite:///study.db or postgresql://user@host/db") from None
    driver = _DEFAULT_DRIVERS.get(parsed.drivername)
    if driver:
        parsed = parsed.set(drivername=driver)
    return parsed.render_as_string(hide_password=False)


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str, create: bool = True, heartbeat: Any = None
                 ) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url`. With `create=False` a SQLite file must already exist.
    With `heartbeat` (interval, grace, retries), running trials beat, and trials of dead
    workers are failed and retried by the live ones."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if not create and not path.is_file():
            raise StorageError(f"no study database at {path} (storage {_shown(url)})")
        path.parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"pool_pre_ping": True} if parsed.get_backend_name() != "sqlite" else {}
    try:
        with warnings.catch_warnings():  # heartbeats are experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            beats = {} if heartbeat is None else {
                "heartbeat_interval": heartbeat.interval,
                "grace_period": heartbeat.grace or 4 * heartbeat.interval,
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=heartbeat.retries)}
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **beats)
    except (SQLAlchemyError, OSError, ImportError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise StorageError(f"cannot open storage {_shown(url)}: {reason}") from None


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def dispose(storage: optuna.storages.RDBStorage) -> None:
    engine: sqlalchemy.Engine = storage.engine
    engine.dispose()
