"""Probe items from JSONL, JSON or CSV files, and their deterministic dev/test split."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

from mergesearch.errors import ProbeError

SPLITS = ("dev", "test")


def read_records(path: Path, where: str) -> list[dict[str, Any]]:
    """All records of a JSONL, JSON (a list, or an object of records) or CSV file.

    `where` names the spec field that pointed here, for error messages.
    """
    if not path.is_file():
        raise ProbeError(f"{where}: probe file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ProbeError(f"{where}: {path} is not UTF-8 text (byte {e.start})") from None
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProbeError(f"{path}:{number}: not valid JSON ({e.msg}) ({where})") from None
            if not isinstance(record, dict):
                raise ProbeError(f"{path}:{number}: each line must be a JSON object ({where})")
            records.append(record)
    elif suffix == ".json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise ProbeError(f"{path}:{e.lineno}: not valid JSON ({e.msg}) ({where})") from None
        if isinstance(data, dict):
            data = [{"id": key, **value} if isinstance(value, dict) else value
                    for key, value in data.items()]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ProbeError(f"{where}: {path} must hold a list of objects, or an object of "
                             "objects keyed by id")
        records = data
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    else:
        raise ProbeError(f"{where}: {path} must end in .jsonl, .json or .csv")
    if not records:
        raise ProbeError(f"{where}: probe file {path} has no items")
    return records


def field_of(record: dict[str, Any], name: str, path: Path, index: int) -> Any:
    if name not in record:
        raise ProbeError(
            f"{path}: item {index + 1} has no field {name!r} (its fields: "
            f"{', '.join(sorted(record))}); map the right column in the probe's `fields`"
        )
    return record[name]


def hashed_split(item_id: str, dev_fraction: float) -> str:
    """dev or test, fixed by the item's id alone so that it never moves between runs."""
    digest = hashlib.sha256(str(item_id).encode()).digest()
    return "dev" if int.from_bytes(digest[:8], "big") / 2**64 < dev_fraction else "test"


def read_ids(path: Path, where: str) -> set[str]:
    """Item ids listed in a file: a JSON list, the keys of a JSON object, or one per line."""
    if not path.is_file():
        raise ProbeError(f"{where}.test_ids: file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProbeError(f"{path}:{e.lineno}: not valid JSON ({e.msg}) ({where})") from None
        if not isinstance(data, list | dict):
            raise ProbeError(f"{where}.test_ids: {path} must hold a list of ids or an object "
                             "keyed by id")
        return {str(i) for i in data}
    return {line.strip() for line in text.splitlines() if line.strip()}
