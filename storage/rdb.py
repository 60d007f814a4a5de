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


def _prepared(url: str, create: bool) -> tuple[str, dict]:
    """The driver-qualified URL (its SQLite folder made) and the engine's arguments."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if not create and not path.is_file():
            raise StorageError(f"no study database at {path} (storage {_shown(url)})")
        path.parent.mkdir(parents=True, exist_ok=True)
    return url, {"pool_pre_ping": True} if parsed.get_backend_name() != "sqlite" else {}


def _unreachable(url: str, error: Exception) -> StorageError:
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    return StorageError(f"cannot open storage {_shown(url)}: {reason}")


def engine_for(url: str, create: bool = True) -> sqlalchemy.Engine:
    """A SQLAlchemy engine on the study database, as `open_storage` would connect."""
    url, engine_kwargs = _prepared(url, create)
    try:
        return sqlalchemy.create_engine(url, **engine_kwargs)
    except (SQLAlchemyError, ImportError) as e:
        raise _unreachable(url, e) from None


def open_storage(url: str, create: bool = True, heartbeat: Any = None
                 ) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url`. With `create=False` a SQLite file must already exist.
    With `heartbeat` (interval, grace, retries), running trials beat, and trials of dead
    workers are failed and retried by the live ones."""
    url, engine_kwargs = _prepared(url, create)
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
        raise _unreachable(url, e) from None


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def dispose(storage: optuna.storages.RDBStorage) -> None:
    engine: sqlalchemy.Engine = storage.engine
    engine.dispose()
