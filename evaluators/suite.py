"""`Suite`: probes grouped into named objectives, evaluated chunk by chunk.

Per-item results stream out of `chunks()` so a caller can store them as they come or stop
early; `summarize()` turns any set of item results into probe metrics and objective values.
An objective is the mean, over its probes, of each probe's value of the objective's metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from evaluators.engines.base import Engine
from evaluators.probes import Probe


@dataclass(frozen=True)
class ObjectiveDef:
    name: str
    probes: tuple[str, ...]
    metric: str | None = None  # None: each probe's default metric
    direction: str = "maximize"


@dataclass(frozen=True)
class ItemResult:
    probe: str
    item_id: str
    split: str
    prompt: str
    output: str
    scores: dict[str, float]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SuiteResult:
    items: list[ItemResult]
    probes: dict[str, dict[str, float]] = field(default_factory=dict)
    objectives: dict[str, float] = field(default_factory=dict)


class Suite:
    def __init__(self, probes: dict[str, Probe], objectives: list[ObjectiveDef]):
        self.probes = probes
        self.objectives = objectives

    def chunks(
        self, engine: Engine, split: str, chunk_size: int = 64
    ) -> Iterator[list[ItemResult]]:
        """Each probe's items in chunks, the probes taking turns chunk by chunk, so that an
        early stop sees every objective soon (the chunks, hence the results, do not depend
        on the order)."""
        for name, chunk in self._interleaved(split, chunk_size):
            began = time.perf_counter()
            results = self.probes[name].run(engine, chunk)
            seconds = (time.perf_counter() - began) / len(chunk)
            yield [
                ItemResult(name, item.id, split, item.prompt, output, scores, seconds)
                for item, (output, scores) in zip(chunk, results, strict=True)
            ]

    def _interleaved(self, split: str, chunk_size: int) -> Iterator[tuple[str, list]]:
        queues = {name: probe.items(split) for name, probe in self.probes.items()}
        for start in range(0, max(map(len, queues.values()), default=0), chunk_size):
            for name, items in queues.items():
                if start < len(items):
                    yield name, items[start : start + chunk_size]

    def summarize(self, items: list[ItemResult]) -> SuiteResult:
        by_probe: dict[str, list[dict[str, float]]] = {}
        for item in items:
            by_probe.setdefault(item.probe, []).append(item.scores)
        probes = {
            name: {m: self.probes[name].aggregate(scores, m) for m in self.probes[name].metrics}
            for name, scores in by_probe.items()
        }
        objectives = {}
        for objective in self.objectives:
            values = [
                probes[p][objective.metric or self.probes[p].default_metric]
                for p in objective.probes
                if p in probes
            ]
            if len(values) == len(objective.probes):
                objectives[objective.name] = sum(values) / len(values)
        return SuiteResult(items, probes, objectives)

    def evaluate(self, engine: Engine, split: str, chunk_size: int = 64,
                 on_items: Callable[[list[ItemResult]], None] | None = None) -> SuiteResult:
        """Evaluate every item of `split`; `on_items` sees each chunk's results as they come
        (to store them, or to stop the evaluation by raising)."""
        items: list[ItemResult] = []
        for chunk in self.chunks(engine, split, chunk_size):
            items += chunk
            if on_items is not None:
                on_items(chunk)
        return self.summarize(items)
