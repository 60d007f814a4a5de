"""The study store: Optuna's RDBStorage on SQLite, PostgreSQL or MySQL/MariaDB."""

from storage.rdb import normalize_url, open_storage, study_names

__all__ = ["normalize_url", "open_storage", "study_names"]
