"""What every probe shares: its spec fields, its items per split, and per-item scoring.

A probe reads its items once; `run` sends a chunk of them to the engine and scores each
output. File-based probes (`FileProbe`) read JSONL, JSON or CSV and split items into dev and
test by a field, by a list of test ids, by one file per split, or by a hash of the item id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from evaluators.data import SPLITS, hashed_split, read_ids, read_records
from evaluators.engines.base import Engine
from mergesearch.errors import ProbeError


class ProbeConfig(BaseModel):
    """Fields common to all probe kinds. Relative paths are resolved against the spec."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    limit: int | None = Field(None, gt=0, description="at most this many items per split")
    max_new_tokens: int = Field(128, gt=0)
    system: str | None = None

    def resolve_paths(self, base_dir: Path) -> None:
        """Make every path field absolute, relative to `base_dir` (the spec's folder)."""
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Path):
                setattr(self, name, (base_dir / value.expanduser()).resolve())
            elif isinstance(value, dict) and value and all(isinstance(v, Path)
                                                           for v in value.values()):
                setattr(self, name, {k: (base_dir / v.expanduser()).resolve()
                                     for k, v in value.items()})


class FileProbeConfig(ProbeConfig):
    path: Path | dict[Literal["dev", "test"], Path] = Field(
        description="a data file, or {dev: FILE, test: FILE}")
    split_field: str = "split"
    test_ids: Path | None = Field(None, description="file of the test split's item ids "
                                  "(JSON list, JSON object keys, or one per line)")
    dev_fraction: float = Field(0.5, gt=0, lt=1)


@dataclass(frozen=True)
class ProbeItem:
    id: str
    prompt: str  # what the item asks, stored with its result
    request: Any  # what the probe sends the engine for it
    data: dict[str, Any]


class Probe:
    """Items of a split, what each asks of the engine, and the scores of its output."""

    metrics: tuple[str, ...] = ()
    default_metric: str = ""

    def __init__(self, config: ProbeConfig, where: str):
        self.config = config
        self.name = config.name
        self.where = where
        self._items: dict[str, list[ProbeItem]] = self.load_items()
        for split, items in self._items.items():
            if not items:
                raise ProbeError(f"{where}: the probe has no {split} items; "
                                 f"{self.split_hint()}")
            if config.limit:
                del items[config.limit :]

    def split_hint(self) -> str:
        return "check its data"

    def load_items(self) -> dict[str, list[ProbeItem]]:
        raise NotImplementedError

    def items(self, split: str) -> list[ProbeItem]:
        return self._items[split]

    def run(self, engine: Engine, items: list[ProbeItem]) -> list[tuple[str, dict[str, float]]]:
        """(output, scores) of each item: by default, greedy generation then `score`."""
        outputs = engine.generate([item.request for item in items])
        return [(output, self.score(item, output))
                for item, output in zip(items, outputs, strict=True)]

    def score(self, item: ProbeItem, output: str) -> dict[str, float]:
        raise NotImplementedError

    def aggregate(self, scores: list[dict[str, float]], metric: str) -> float:
        """The probe-level value of `metric` over items' scores (the mean, unless a probe
        defines it otherwise)."""
        return sum(s[metric] for s in scores) / len(scores)


def pooled_mean(scores: list[dict[str, float]], metric: str, count: str) -> float:
    """The mean over all the entries behind per-item means (`metric` of `count` entries
    each), as IFEval's instruction-level accuracy pools instructions across prompts."""
    total = sum(s[count] for s in scores)
    return sum(s[metric] * s[count] for s in scores) / total if total else 0.0


class FileProbe(Probe):
    """A probe whose items are records of data files; `make_item` turns one into an item."""

    config: FileProbeConfig
    def split_hint(self) -> str:
        if self.config.test_ids is not None:
            return (f"check that the ids in {self.config.test_ids} are item ids of "
                    f"{self.config.path} (and that not every item is listed)")
        return ("give each item a split field of dev or test, or leave it out to split by "
                "id, or give one file per split")

    def records(self) -> list[tuple[dict[str, Any], Path, int, str | None]]:
        """(record, file, index in file, split the file fixes or None) of every record."""
        path = self.config.path
        files = path.items() if isinstance(path, dict) else [(None, path)]
        return [(record, file, index, split)
                for split, file in files
                for index, record in enumerate(read_records(file, self.where))]

    def load_items(self) -> dict[str, list[ProbeItem]]:
        config = self.config
        if isinstance(config.path, dict) and set(config.path) != set(SPLITS):
            raise ProbeError(f"{self.where}.path: give a file for both dev and test, or one "
                             "file for both")
        if isinstance(config.path, dict) and config.test_ids is not None:
            raise ProbeError(f"{self.where}.test_ids: the files per split already fix the "
                             "test split; give one or the other")
        test_ids = read_ids(config.test_ids, self.where) if config.test_ids else None
        items: dict[str, list[ProbeItem]] = {split: [] for split in SPLITS}
        for record, file, index, split in self.records():
            item = self.make_item(record, file, index)
            if split is None:
                split = ("test" if item.id in test_ids else "dev") if test_ids is not None \
                    else self._split_of(record, item.id, file, index)
            items[split].append(item)
        return items

    def _split_of(self, record: dict[str, Any], item_id: str, file: Path, index: int) -> str:
        split = record.get(self.config.split_field)
        if split is None:
            return hashed_split(item_id, self.config.dev_fraction)
        if split not in SPLITS:
            raise ProbeError(f"{file}: item {index + 1} has {self.config.split_field}="
                             f"{split!r}; expected dev or test")
        return split

    def make_item(self, record: dict[str, Any], file: Path, index: int) -> ProbeItem:
        raise NotImplementedError
