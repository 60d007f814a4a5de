"""Choice probes (medical QA): each option is scored by the log-likelihood of
`context + " " + option` as lm-eval scores `multiple_choice` tasks; the prediction is the
most likely option (`acc`) or the most likely per character of the option (`acc_norm`).
Probe-level `macro_f1` is the F1 of the `acc` predictions averaged over the answer classes.

Readers (`format`): PubMedQA's `ori_pqal.json`, MedQA's JSONL (question, options by letter,
answer_idx), MedMCQA's JSONL (question, opa..opd, cop counted from 1 as released), and
`records`: any file with the fields named in `fields`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from evaluators.data import field_of
from evaluators.engines.base import LoglikelihoodRequest
from evaluators.probes.base import FileProbe, FileProbeConfig, ProbeItem
from evaluators.probes.templates import PromptTemplate
from mergesearch.errors import ProbeError

LETTERS = "ABCDEFGHIJ"
LISTED = ("Question: {{ question }}\n{% for option in options %}{{ letters[loop.index0] }}. "
          "{{ option }}\n{% endfor %}Answer:")
TEMPLATES = {  # lm-eval's prompts for the same data sets
    "pubmedqa": "Abstract: {{ context }}\nQuestion: {{ question }}\nAnswer:",
    "medqa": LISTED,
    "medmcqa": LISTED.replace("\n{% for", "\nChoices:\n{% for"),
    "records": LISTED,
}


class ChoiceFields(BaseModel):
    """For `format: records`: the id, question, options (a field holding a list or an
    object by letter, or a list of fields) and answer (an index from 0, a letter, or the
    option's text); `context` is optional."""

    model_config = ConfigDict(extra="forbid")

    id: str = "id"
    question: str = "question"
    options: str | list[str] = "options"
    answer: str = "answer"
    context: str | None = None


class ChoiceProbeConfig(FileProbeConfig):
    kind: Literal["choice"]
    format: Literal["records", "pubmedqa", "medqa", "medmcqa"] = "records"
    fields: ChoiceFields = ChoiceFields()
    template: str | None = Field(None, description="Jinja prompt over question, options, "
                                 "letters, context and the record's fields (default: lm-eval's "
                                 "prompt for the format)")
    score_letters: bool | None = Field(
        None, description="score the option letters (lm-eval's MedQA/MedMCQA) rather than "
        "the option texts; default: letters with a format's own prompt that lists the "
        "options (medqa, medmcqa, records), texts with pubmedqa or a template of your own")


def _options(raw: Any, file: Path, index: int) -> list[str]:
    if isinstance(raw, dict):
        return [str(raw[k]) for k in sorted(raw)]
    if isinstance(raw, list) and raw:
        return [str(o) for o in raw]
    raise ProbeError(f"{file}: item {index + 1}: options must be a list or an object by letter, "
                     f"not {raw!r}")


def _texts(value: Any, name: str, file: Path, index: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProbeError(f"{file}: item {index + 1}: {name} must be a list of strings")
    return value


def _answer_index(answer: Any, options: list[str], file: Path, index: int) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    text = str(answer).strip()
    if text in options:
        return options.index(text)
    if len(text) == 1 and text.upper() in LETTERS[: len(options)]:
        return LETTERS.index(text.upper())
    if text.isdigit() and int(text) < len(options):
        return int(text)
    raise ProbeError(f"{file}: item {index + 1}: answer {answer!r} is not among its "
                     f"{len(options)} options {options}")


class ChoiceProbe(FileProbe):
    config: ChoiceProbeConfig
    metrics = ("acc", "acc_norm", "macro_f1")
    default_metric = "acc"

    def __init__(self, config: ChoiceProbeConfig, where: str):
        unused = sorted({"system", "max_new_tokens"} & config.model_fields_set)
        if unused:
            raise ProbeError(f"{where}.{unused[0]}: choice probes score log-likelihoods of "
                             "raw text; they take no system prompt and generate nothing")
        text = config.template or TEMPLATES[config.format]
        self.template = PromptTemplate(text, where)
        # lm-eval scores the letters of prompts that list the options (MedQA, MedMCQA)
        listed = config.template is None and config.format != "pubmedqa"
        self.letters = config.score_letters if config.score_letters is not None else listed
        super().__init__(config, where)

    def _parsed(self, record: dict[str, Any], file: Path, index: int) -> dict[str, Any]:
        """The record as {id, question, options, answer, context}."""
        fmt = self.config.format
        if fmt == "pubmedqa":
            options = ["yes", "no", "maybe"]
            return {"id": record.get("id", index),
                    "question": field_of(record, "QUESTION", file, index),
                    "context": "\n".join(_texts(field_of(record, "CONTEXTS", file, index),
                                                "CONTEXTS", file, index)),
                    "options": options,
                    "answer": _answer_index(field_of(record, "final_decision", file, index),
                                            options, file, index)}
        if fmt == "medqa":
            options = _options(field_of(record, "options", file, index), file, index)
            return {"id": record.get("id", index), "question": field_of(record, "question",
                                                                        file, index),
                    "options": options, "context": "",
                    "answer": _answer_index(field_of(record, "answer_idx", file, index),
                                            options, file, index)}
        if fmt == "medmcqa":
            options = [str(field_of(record, k, file, index)) for k in ("opa", "opb", "opc",
                                                                       "opd")]
            cop = field_of(record, "cop", file, index)
            if not isinstance(cop, int) or not 1 <= cop <= 4:
                raise ProbeError(f"{file}: item {index + 1}: cop {cop!r} is not among its 4 "
                                 "options (1-4, as MedMCQA releases it)")
            return {"id": record.get("id", index), "question": field_of(record, "question",
                                                                        file, index),
                    "options": options, "answer": cop - 1, "context": ""}
        fields = self.config.fields
        raw = ([field_of(record, f, file, index) for f in fields.options]
               if isinstance(fields.options, list)
               else field_of(record, fields.options, file, index))
        options = _options(raw, file, index)
        return {"id": record.get(fields.id, index),
                "question": field_of(record, fields.question, file, index),
                "context": field_of(record, fields.context, file, index) if fields.context
                else "",
                "options": options,
                "answer": _answer_index(field_of(record, fields.answer, file, index), options,
                                        file, index)}

    def make_item(self, record: dict[str, Any], file: Path, index: int) -> ProbeItem:
        parsed = self._parsed(record, file, index)
        if len(parsed["options"]) > len(LETTERS):
            raise ProbeError(f"{file}: item {index + 1}: {len(parsed['options'])} options; "
                             f"at most {len(LETTERS)} are supported")
        prompt = self.template.render({**record, **parsed, "letters": LETTERS}, file, index)
        options = parsed["options"]
        choices = list(LETTERS[: len(options)]) if self.letters else options
        requests = [LoglikelihoodRequest(prompt, f" {choice}") for choice in choices]
        return ProbeItem(str(parsed["id"]), prompt, requests,
                         {"choices": choices, "answer": parsed["answer"]})

    def run(self, engine, items):
        flat = [request for item in items for request in item.request]
        scores = [logprob for logprob, _ in engine.loglikelihood(flat)]
        results, at = [], 0
        for item in items:
            choices, answer = item.data["choices"], item.data["answer"]
            mine = scores[at : at + len(choices)]
            at += len(choices)
            pred = max(range(len(choices)), key=lambda i: mine[i])
            pred_norm = max(range(len(choices)), key=lambda i: mine[i] / len(choices[i]))
            results.append((choices[pred], {
                "acc": float(pred == answer), "acc_norm": float(pred_norm == answer),
                "pred": float(pred), "gold": float(answer)}))
        return results

    def aggregate(self, scores: list[dict[str, float]], metric: str) -> float:
        if metric != "macro_f1":
            return super().aggregate(scores, metric)
        classes = {s["gold"] for s in scores} | {s["pred"] for s in scores}
        f1s = []
        for c in classes:
            tp = sum(s["pred"] == c and s["gold"] == c for s in scores)
            predicted = sum(s["pred"] == c for s in scores)
            actual = sum(s["gold"] == c for s in scores)
            f1s.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
        return sum(f1s) / len(f1s)
