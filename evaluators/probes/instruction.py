"""Instruction-following probes in IFEval's format, scored by lm-eval's IFEval checkers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from evaluators.data import field_of
from evaluators.engines.base import GenerationRequest
from evaluators.probes.base import FileProbe, FileProbeConfig, ProbeItem
from evaluators.probes.ifeval_checks import (
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
        if not doc["instruction_id_list"]:
            raise ProbeError(f"{path}: item {index + 1}: instruction_id_list is empty")
        unknown = [i for i in doc["instruction_id_list"] if i not in self.known]
        if unknown:
            raise ProbeError(f"{path}: item {index + 1}: unknown IFEval instruction {unknown[0]!r}")
        if len(doc["kwargs"]) != len(doc["instruction_id_list"]):
            raise ProbeError(
                f"{path}: item {index + 1}: kwargs must have one entry per instruction"
            )
        for instruction, kwargs in zip(doc["instruction_id_list"], doc["kwargs"], strict=True):
            try:  # IFEval's checkers take their arguments here; a wrong one fails now
                instruction_description(instruction, {k: v for k, v in (kwargs or {}).items()
                                                      if v})  # lm-eval drops falsy values
            except (TypeError, ValueError) as e:
                raise ProbeError(f"{path}: item {index + 1}: kwargs of {instruction!r}: "
                                 f"{e}") from None
        item_id = str(record.get(self.config.id_field, index))
        request = GenerationRequest(doc["prompt"], self.config.max_new_tokens, self.config.system)
        return ProbeItem(item_id, doc["prompt"], request, doc)

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
        followed = sum(s[metric] * s["n_instructions"] for s in scores)
        return followed / sum(s["n_instructions"] for s in scores)
