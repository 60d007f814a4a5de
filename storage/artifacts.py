"""Per-trial item outputs as Optuna artifacts, so that optuna-dashboard shows them.

Artifacts live in a file-system artifact store: by default a folder beside a SQLite study
database (`study.db` -> `study.artifacts/`), or `artifacts/` beside the spec for a server
database; workers on several machines need it on a shared file system (`artifacts:` in the
spec). Each artifact is a JSON Lines file, one item per line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from sqlalchemy.engine import make_url


def default_artifact_dir(storage_url: str, spec_dir: Path) -> Path:
    parsed = make_url(storage_url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        database = Path(parsed.database)
        return database.parent / f"{database.stem}.artifacts"
    return spec_dir / "artifacts"


def artifact_store(folder: Path) -> FileSystemArtifactStore:
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def upload_jsonl(store: FileSystemArtifactStore, name: str, rows: Iterable[dict],
                 to: optuna.Trial | optuna.Study) -> str:
    """Write `rows` as `name` (a .jsonl file) and attach it to a running trial or a study;
    returns the artifact id."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return upload_artifact(artifact_store=store, file_path=path, study_or_trial=to,
                               mimetype="application/jsonl", encoding="utf-8")
