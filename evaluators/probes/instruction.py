"""Instruction-following probes in IFEval's format, scored by lm-eval's IFEval checkers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from evaluators.data import field_of
from evaluators.engines.base import GenerationRequest
from evaluators.probes.base import FileProbe, FileProbeConfig, ProbeItem, pooled_mean
from evaluators.probes.ifeval_checks import (
    instruction_arguments,
    instruction_description,
    instruction_results,
    known_instruction_ids,
)
from mergesearch.errors import ProbeError

_PROMPT_LEVEL = {"prompt_level_strict": "prompt_level_strict_acc",
                 "prompt_level_loose": "prompt_level_loose_acc"}
_INST_LEVEL = {"inst_level_strict": "inst_level_strict_acc",
               "inst_level_loose": "inst_level_loose_acc"}


class InstructionProbeConfig(FileProbeConfig):
    kind: Literal["instruction"]
    id_field: str = "key"
    max_new_tokens: int = Field(1280, gt=0, description="IFEval's own budget by default")


class InstructionProbe(FileProbe):
    """Items are IFEval records: `key`, `prompt`, `instruction_id_list`, `kwargs`.

    Per item, prompt-level scores are 0/1 and instruction-level scores are the fraction of
    the item's instructions followed; the probe's instruction-level value pools all
    instructions across items, as IFEval defines it.
    """

    metrics = (*_PROMPT_LEVEL, *_INST_LEVEL)
    default_metric = "prompt_level_strict"

    def __init__(self, config: InstructionProbeConfig, where: str):
        self.known = known_instruction_ids()
        super().__init__(config, where)

    def make_item(self, record: dict[str, Any], path: Path, index: int) -> ProbeItem:
        doc = {k: field_of(record, k, path, index) for k in ("prompt", "instruction_id_list",
                                                              "kwargs")}
        where = f"{path}: item {index + 1}"
        ids, kwargs = doc["instruction_id_list"], doc["kwargs"]
        if not isinstance(doc["prompt"], str):
            raise ProbeError(f"{where}: prompt must be text")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not ids:
            raise ProbeError(f"{where}: instruction_id_list must be a non-empty list of ids")
        unknown = [i for i in ids if i not in self.known]
        if unknown:
            raise ProbeError(f"{where}: unknown IFEval instruction {unknown[0]!r}")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(
                isinstance(k, dict) for k in kwargs):
            raise ProbeError(f"{where}: kwargs must be a list of one object per instruction")
        for instruction, given in zip(ids, kwargs, strict=True):
            self._check_arguments(instruction, given, where)
        item_id = str(record.get(self.config.id_field, index))
        request = GenerationRequest(doc["prompt"], self.config.max_new_tokens, self.config.system)
        return ProbeItem(item_id, doc["prompt"], request, doc)

    @staticmethod
    def _check_arguments(instruction: str, given: dict[str, Any], where: str) -> None:
        """IFEval's checkers fill a missing argument at random (so scores would vary from
        call to call) and fail on unknown ones: both are refused here, before any model work.
        Falsy values count as missing, as lm-eval drops them."""
        present = {k: v for k, v in given.items() if v}
        missing = sorted(set(instruction_arguments(instruction)) - set(present))
        if missing:
            raise ProbeError(f"{where}: kwargs of {instruction!r} lack {', '.join(missing)}")
        try:
            instruction_description(instruction, present)
        except (TypeError, ValueError, AttributeError) as e:
            raise ProbeError(f"{where}: kwargs of {instruction!r}: {e}") from None

    def score(self, item: ProbeItem, output: str) -> dict[str, float]:
        results = instruction_results(item.data, output)
        scores = {name: float(results[key]) for name, key in _PROMPT_LEVEL.items()}
        for name, key in _INST_LEVEL.items():
            scores[name] = sum(results[key]) / len(results[key])
        scores["n_instructions"] = float(len(results["inst_level_strict_acc"]))
        return scores

    def aggregate(self, scores: list[dict[str, float]], metric: str) -> float:
        if metric not in _INST_LEVEL:
            return super().aggregate(scores, metric)
        return pooled_mean(scores, metric, "n_instructions")
