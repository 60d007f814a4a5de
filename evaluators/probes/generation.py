"""Generation probes: a Jinja prompt over an item's fields, scored against a reference by
ROUGE-1/2/L and sentence BLEU (clinical summarisation: findings -> impression, question ->
short question, dialogue -> note section, discharge note -> summary), and by BERTScore
with a local scoring model when one is named."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import sacrebleu
from pydantic import BaseModel, ConfigDict, Field
from rouge_score import rouge_scorer

from evaluators.data import field_of, read_records
from evaluators.engines.base import GenerationRequest
from evaluators.probes.base import FileProbe, FileProbeConfig, ProbeItem
from evaluators.probes.templates import PromptTemplate
from mergesearch.errors import ProbeError


class GenerationFields(BaseModel):
    """Which record field holds the item id, the model input and the reference output."""

    model_config = ConfigDict(extra="forbid")

    id: str = "id"
    input: str = "input"
    reference: str = "reference"


class GenerationProbeConfig(FileProbeConfig):
    kind: Literal["generation"]
    fields: GenerationFields = GenerationFields()
    template: str = Field("{{ input }}", description="Jinja prompt over the item's fields "
                          "(`input` is the mapped input field)")
    chat: bool = Field(True, description="wrap prompts in the model's chat template")
    stop: list[str] = Field(default_factory=list, description="strings that end an output")
    fewshot: int = Field(0, ge=0, description="worked examples before each prompt")
    fewshot_path: Path | None = Field(
        None, description="file the examples come from (same fields); default: the first "
        "dev items, which are then not scored")
    bertscore_model: Path | None = Field(
        None, description="local encoder folder: adds `bertscore` (F1 of greedy-matched "
        "token embeddings)")


class GenerationProbe(FileProbe):
    config: GenerationProbeConfig
    metrics = ("rouge1", "rouge2", "rougeL", "bleu")
    default_metric = "rougeL"

    def __init__(self, config: GenerationProbeConfig, where: str):
        self.template = PromptTemplate(config.template, where)
        self.scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        self.bertscore = None
        if config.bertscore_model is not None:
            from evaluators.probes.bertscore import BertScorer

            self.bertscore = BertScorer(config.bertscore_model, f"{where}.bertscore_model")
            self.metrics = (*self.metrics, "bertscore")
        self.examples: tuple[tuple[str, str], ...] = ()
        super().__init__(config, where)

    def load_items(self) -> dict[str, list[ProbeItem]]:
        config = self.config
        items = super().load_items()
        if config.fewshot_path is not None:
            shots = [self.make_item(r, config.fewshot_path, i) for i, r in
                     enumerate(read_records(config.fewshot_path, f"{self.where}.fewshot_path"))]
            test = {(i.prompt, i.data["reference"]) for i in items["test"]}
            if any((s.prompt, s.data["reference"]) in test for s in shots[: config.fewshot]):
                raise ProbeError(f"{self.where}.fewshot_path: an example is also a test item")
        else:
            shots = items["dev"][: config.fewshot]
            del items["dev"][: config.fewshot]
        if len(shots) < config.fewshot:
            raise ProbeError(f"{self.where}.fewshot: {config.fewshot} examples asked for, "
                             f"{len(shots)} available")
        self.examples = tuple((s.prompt, s.data["reference"]) for s in shots[: config.fewshot])
        return {split: [self._with_examples(item) for item in split_items]
                for split, split_items in items.items()}

    def _with_examples(self, item: ProbeItem) -> ProbeItem:
        request = GenerationRequest(item.prompt, self.config.max_new_tokens, self.config.system,
                                    self.config.chat, tuple(self.config.stop), self.examples)
        return ProbeItem(item.id, item.prompt, request, item.data)

    def make_item(self, record: dict[str, Any], file: Path, index: int) -> ProbeItem:
        fields = self.config.fields
        values = {**record, "input": field_of(record, fields.input, file, index)}
        prompt = self.template.render(values, file, index)
        reference = str(field_of(record, fields.reference, file, index))
        item_id = str(record.get(fields.id, index))
        return ProbeItem(item_id, prompt, None, {"reference": reference})

    def run(self, engine, items):
        results = super().run(engine, items)
        if self.bertscore is not None:
            f1 = self.bertscore.f1([o for o, _ in results], [i.data["reference"] for i in items])
            for (_, scores), value in zip(results, f1, strict=True):
                scores["bertscore"] = value
        return results

    def score(self, item: ProbeItem, output: str) -> dict[str, float]:
        reference = item.data["reference"]
        scores = self.scorer.score(reference, output)
        bleu = sacrebleu.sentence_bleu(output, [reference]).score / 100
        return {**{name: scores[name].fmeasure for name in ("rouge1", "rouge2", "rougeL")},
                "bleu": bleu}
