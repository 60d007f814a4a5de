"""Generation probes: a Jinja prompt over an item's fields, scored by ROUGE against a
reference (clinical summarisation: findings -> impression, question -> summary, ...)."""

from __future__ import annotations

from typing import Any, Literal

import jinja2
from pydantic import BaseModel, ConfigDict
from rouge_score import rouge_scorer

from evaluators.data import field_of
from evaluators.engines.base import GenerationRequest
from evaluators.probes.base import Probe, ProbeConfig, ProbeItem
from mergesearch.errors import ProbeError


class GenerationFields(BaseModel):
    """Which record field holds the item id, the model input and the reference output."""

    model_config = ConfigDict(extra="forbid")

    id: str = "id"
    input: str = "input"
    reference: str = "reference"


class GenerationProbeConfig(ProbeConfig):
    kind: Literal["generation"]
    fields: GenerationFields = GenerationFields()
    template: str = "{{ input }}"


class GenerationProbe(Probe):
    metrics = ("rouge1", "rouge2", "rougeL")
    default_metric = "rougeL"

    def __init__(self, config: GenerationProbeConfig, where: str):
        try:
            self.template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
                config.template
            )
        except jinja2.TemplateSyntaxError as e:
            raise ProbeError(f"{where}.template: invalid Jinja template ({e.message})") from None
        self.scorer = rouge_scorer.RougeScorer(list(self.metrics), use_stemmer=True)
        super().__init__(config, where)

    def make_item(self, record: dict[str, Any], index: int) -> ProbeItem:
        fields = self.config.fields
        path = self.config.path
        values = {**record, "input": field_of(record, fields.input, path, index)}
        try:
            prompt = self.template.render(**values)
        except jinja2.UndefinedError as e:
            raise ProbeError(f"{path}: item {index + 1}: template needs {e.message}") from None
        reference = str(field_of(record, fields.reference, path, index))
        item_id = str(record.get(fields.id, index))
        request = GenerationRequest(prompt, self.config.max_new_tokens, self.config.system)
        return ProbeItem(item_id, request, {"reference": reference})

    def score(self, item: ProbeItem, output: str) -> dict[str, float]:
        scores = self.scorer.score(item.data["reference"], output)
        return {name: scores[name].fmeasure for name in self.metrics}
