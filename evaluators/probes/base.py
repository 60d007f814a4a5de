"""What every probe shares: its spec fields, its items per split, and per-item scoring."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evaluators.data import SPLITS, hashed_split, read_records
from evaluators.engines.base import GenerationRequest
from mergesearch.errors import ProbeError


class ProbeConfig(BaseModel):
    """Fields common to all probe kinds. Relative paths are resolved against the spec."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path
    split_field: str = "split"
    dev_fraction: float = Field(0.5, gt=0, lt=1)
    limit: int | None = Field(None, gt=0, description="at most this many items per split")
    max_new_tokens: int = Field(128, gt=0)
    system: str | None = None


@dataclass(frozen=True)
class ProbeItem:
    id: str
    request: GenerationRequest
    data: dict[str, Any]


class Probe:
    """Items of a split, the request each makes, and the scores of an output."""

    metrics: tuple[str, ...] = ()
    default_metric: str = ""

    def __init__(self, config: ProbeConfig, where: str):
        self.config = config
        self.name = config.name
        records = read_records(config.path, where)
        self._items: dict[str, list[ProbeItem]] = {split: [] for split in SPLITS}
        for index, record in enumerate(records):
            item = self.make_item(record, index)
            self._items[self._split_of(record, item.id, index)].append(item)
        for split, items in self._items.items():
            if not items:
                raise ProbeError(
                    f"{where}: probe file {config.path} has no {split} items; give each item a "
                    f"{config.split_field!r} of dev or test, or leave that field out to split "
                    "by id"
                )
            if config.limit:
                del items[config.limit :]

    def _split_of(self, record: dict[str, Any], item_id: str, index: int) -> str:
        split = record.get(self.config.split_field)
        if split is None:
            return hashed_split(item_id, self.config.dev_fraction)
        if split not in SPLITS:
            raise ProbeError(
                f"{self.config.path}: item {index + 1} has {self.config.split_field}="
                f"{split!r}; expected dev or test"
            )
        return split

    def items(self, split: str) -> list[ProbeItem]:
        return self._items[split]

    def make_item(self, record: dict[str, Any], index: int) -> ProbeItem:
        raise NotImplementedError

    def score(self, item: ProbeItem, output: str) -> dict[str, float]:
        raise NotImplementedError

    def aggregate(self, scores: list[dict[str, float]], metric: str) -> float:
        """The probe-level value of `metric` over items' scores (the mean, unless a probe
        defines it otherwise)."""
        return sum(s[metric] for s in scores) / len(scores)
