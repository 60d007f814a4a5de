"""lm-eval task probes: any lm-eval task, by name, run by lm-eval itself over our engine.

The task (built-in, or a user YAML in `include_path`) is loaded once when the probe is
built; its evaluation documents (the test split, else validation, as lm-eval picks) are the
probe's items, with the document's index as id, split into dev and test by a hash of the id.

`run` hands exactly the chunk's documents to `lm_eval.evaluator.evaluate` (its `samples`
argument), so prompts, few-shot examples, filters and per-document metrics are lm-eval's own.
The model is `EngineLM`, an `lm_eval.api.model.LM` that forwards lm-eval's requests to the
live engine: nothing is rebuilt per call, and nothing is cached between calls (no response
cache, no request cache), so a run after `engine.load_recipe` sees the new weights.

Per item, scores are the document's metric values from lm-eval's logged samples (named
`metric`, or `metric,filter` for a filter other than `none`). A metric whose per-document
value is a list (IFEval's instruction-level accuracies) is stored as its mean plus
`<metric>_count`, and aggregated by pooling all list entries, as IFEval's aggregation does;
scalar metrics are aggregated by the task's own aggregation function. Metrics whose
aggregation needs more than a number per document (corpus BLEU, F1, weighted perplexity,
bits per byte...) are left out.

Not supported: task groups and tags (one task per probe), rolling log-likelihood tasks
(perplexity over whole texts, e.g. wikitext), and tasks lm-eval marks unsafe or multimodal.
Generation is the engine's greedy decoding; sampling settings in a task are ignored.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any, Literal

from lm_eval.api.model import LM
from lm_eval.api.registry import AGGREGATION_REGISTRY
from lm_eval.api.task import Task
from lm_eval.defaults import DEFAULT_OTHER_SEED
from lm_eval.evaluator import evaluate
from lm_eval.tasks import TaskManager
from pydantic import Field

from evaluators.data import hashed_split
from evaluators.engines.base import Engine, GenerationRequest, LoglikelihoodRequest
from evaluators.probes.base import Probe, ProbeConfig, ProbeItem, pooled_mean
from evaluators.probes.ifeval_checks import ensure_sentence_tokenizer
from mergesearch.errors import ProbeError

# Aggregations over more than one number per document (pairs, strings): not storable as
# per-item floats, so their metrics are not offered.
UNSUPPORTED_AGGREGATIONS = {"weighted_perplexity", "bits_per_byte", "f1", "matthews_corrcoef",
                            "bleu", "chrf", "chrf++", "ter", "brier_score", "bypass"}


class LmEvalProbeConfig(ProbeConfig):
    kind: Literal["lm_eval"]
    task: str = Field(description="lm-eval task name, built in or defined in include_path")
    include_path: Path | None = Field(None, description="folder of user task YAML files")
    metric: str | None = Field(None, description="default metric (default: the task's first)")
    num_fewshot: int | None = Field(None, ge=0, description="default: the task's own")
    apply_chat_template: bool = Field(False, description="format prompts with the model's "
                                      "chat template, as lm-eval's --apply_chat_template")
    dev_fraction: float = Field(0.5, gt=0, lt=1)


def _lm_eval_split(context: str, continuation: str) -> LoglikelihoodRequest:
    """lm-eval moves all whitespace ending a context (newlines too) into the continuation;
    the engine itself moves only spaces, so do the rest here to score as lm-eval does."""
    stripped = context.rstrip()
    return LoglikelihoodRequest(stripped, context[len(stripped):] + continuation)


class EngineLM(LM):
    """lm-eval's model interface over a live engine. Contexts arrive formatted by lm-eval
    (chat template included when asked), so they go to the engine as plain text."""

    def __init__(self, engine: Engine, max_new_tokens: int):
        super().__init__()
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        tokenizer = engine.tokenizer
        # The engine adds BOS to plain text; a chat template that writes it too would give
        # two (lm-eval's own HF model skips adding it then).
        adds_bos = tokenizer.bos_token is not None and \
            tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        self._bos = tokenizer.bos_token if adds_bos else None

    def _text(self, context: str) -> str:
        if self._bos and context.startswith(self._bos):
            return context[len(self._bos) :]
        return context

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        # lm-eval conditions an empty context on BOS, or on EOS where there is no BOS.
        empty = "" if self._bos else self.engine.tokenizer.eos_token
        return self.engine.loglikelihood(
            [_lm_eval_split(self._text(context) or empty, continuation)
             for context, continuation in (r.args for r in requests)])

    def loglikelihood_rolling(self, requests) -> list[float]:
        raise ProbeError("rolling log-likelihood (perplexity) tasks are not supported")

    def generate_until(self, requests) -> list[str]:
        engine_requests = []
        for context, gen_kwargs in (r.args for r in requests):
            until = gen_kwargs.get("until") or []
            engine_requests.append(GenerationRequest(
                prompt=self._text(context), chat=False,
                stop=(until,) if isinstance(until, str) else tuple(until),
                max_new_tokens=gen_kwargs.get("max_gen_toks", self.max_new_tokens),
                strip=False))
        return self.engine.generate(engine_requests)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.engine.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.engine.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.engine.tokenizer.chat_template if chat_template else None


@functools.cache
def _all_tasks(include_path: Path | None) -> TaskManager:
    # Indexing lm-eval's built-in tasks takes seconds: one index per include path.
    return TaskManager(include_path=str(include_path) if include_path else None)


def _prepare_ifeval_checkers() -> None:
    """IFEval's checkers fetch nltk data when imported, which happens as its task loads: make
    the offline fallback findable first. Its language checks are random unless seeded."""
    ensure_sentence_tokenizer()
    try:
        import langdetect
    except ImportError:
        return
    langdetect.DetectorFactory.seed = 0


def _load_task(name: str, include_path: Path | None, where: str) -> Task:
    _prepare_ifeval_checkers()
    manager = None
    if include_path is not None:  # a user task: index only its folder, which is quick
        if not include_path.is_dir():
            raise ProbeError(f"{where}.include_path: folder {include_path} does not exist")
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if name not in manager.all_subtasks:
            manager = None
    manager = manager or _all_tasks(include_path)
    if name not in manager.all_tasks:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ProbeError(f"{where}.task: lm-eval has no task {name!r}{hint}")
    if name not in manager.all_subtasks:
        raise ProbeError(f"{where}.task: {name!r} is a group or tag of lm-eval tasks; give one "
                         "task per probe")
    try:
        tasks = manager.load(name)["tasks"]
    except Exception as e:  # lm-eval and datasets raise many kinds for one cause
        raise ProbeError(f"{where}: lm-eval task {name!r} could not be loaded "
                         f"({type(e).__name__}: {e}); its data set must be readable offline "
                         "(a local dataset_path, or the Hugging Face cache)") from None
    return next(iter(tasks.values()))


class LmEvalProbe(Probe):
    config: LmEvalProbeConfig

    def split_hint(self) -> str:
        return "the task has too few documents for both splits; change dev_fraction"

    def __init__(self, config: LmEvalProbeConfig, where: str):
        self.task = _load_task(config.task, config.include_path, where)
        self.task_name = self.task.task_name
        kind = self.task.OUTPUT_TYPE
        if kind == "loglikelihood_rolling":
            raise ProbeError(f"{where}.task: {config.task!r} scores rolling log-likelihoods "
                             "(perplexity), which this probe does not support")
        if getattr(self.task, "UNSAFE_CODE", False) or getattr(self.task, "MULTIMODAL", False):
            raise ProbeError(f"{where}.task: {config.task!r} runs generated code or needs "
                             "images; not supported")
        self._set_num_fewshot(config, where)
        self._aggregations = {
            metric: fn for metric, fn in self.task.aggregation().items()
            if _registry_name(fn) not in UNSUPPORTED_AGGREGATIONS}
        filters = [f["name"] for f in self.task.config.filter_list or [{"name": "none"}]]
        self.metrics = tuple(_metric_name(m, f) for f in filters for m in self._aggregations)
        if not self.metrics:
            raise ProbeError(f"{where}.task: none of {config.task!r}'s metrics "
                             f"({', '.join(self.task.aggregation())}) can be scored per item")
        if config.metric is not None and config.metric not in self.metrics:
            raise ProbeError(f"{where}.metric: task {config.task!r} has no metric "
                             f"{config.metric!r} (it has {', '.join(self.metrics)})")
        self.default_metric = config.metric or self.metrics[0]
        self.last_results: dict[str, Any] | None = None  # lm-eval's answer to the last run
        super().__init__(config, where)

    def _set_num_fewshot(self, config: LmEvalProbeConfig, where: str) -> None:
        """As `simple_evaluate` does: the probe's count, unless the task fixes zero."""
        own = self.task.get_config("num_fewshot")
        if config.num_fewshot is not None and config.num_fewshot != (own or 0):
            if own == 0:
                raise ProbeError(f"{where}.num_fewshot: task {config.task!r} is zero-shot by "
                                 "definition; leave num_fewshot out")
            self.task.set_config(key="num_fewshot", value=config.num_fewshot)
        elif own is None:
            self.task.set_config(key="num_fewshot", value=0)

    def load_items(self) -> dict[str, list[ProbeItem]]:
        items: dict[str, list[ProbeItem]] = {"dev": [], "test": []}
        for index, doc in enumerate(self.task.eval_docs):
            item_id = str(index)
            prompt = str(self.task.doc_to_text(doc))
            items[hashed_split(item_id, self.config.dev_fraction)].append(
                ProbeItem(item_id, prompt, index, {}))
        return items

    def run(self, engine: Engine, items: list[ProbeItem]) -> list[tuple[str, dict[str, float]]]:
        if self.config.apply_chat_template and not engine.tokenizer.chat_template:
            raise ProbeError(f"{self.where}.apply_chat_template: the model's tokenizer has "
                             "no chat template")
        # Few-shot examples are drawn in document order from this seed, so a chunk gets the
        # same prompts every run (lm-eval's default seed).
        self.task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        # `samples` must be sorted: lm-eval maps results back to indices by position.
        indices = sorted(item.request for item in items)
        chat = self.config.apply_chat_template
        results = evaluate(
            lm=EngineLM(engine, self.config.max_new_tokens),
            task_dict={"tasks": {self.task_name: self.task}, "groups": {}},
            samples={self.task_name: indices},
            cache_requests=False,
            bootstrap_iters=0,
            log_samples=True,
            system_instruction=self.config.system,
            apply_chat_template=chat,
            fewshot_as_multiturn=chat,
        )
        self.last_results = results
        by_doc: dict[int, tuple[str, dict[str, float]]] = {}
        for sample in results["samples"][self.task_name]:
            _, scores = by_doc.setdefault(sample["doc_id"], (self._output(sample), {}))
            for metric in sample["metrics"]:
                if metric in self._aggregations:
                    self._store(scores, _metric_name(metric, sample["filter"]), sample[metric])
        return [by_doc[item.request] for item in items]

    def _output(self, sample: dict[str, Any]) -> str:
        """The model's answer: the generated text, the most likely choice, or the
        continuation's log-likelihood."""
        responses = [r[0] for r in sample["resps"]]
        if self.task.OUTPUT_TYPE == "generate_until":
            return responses[0]
        if self.task.OUTPUT_TYPE == "multiple_choice":
            best = max(range(len(responses)), key=lambda i: responses[i][0])
            choices = self.task.doc_to_choice(sample["doc"])
            return str(choices[best]) if len(choices) == len(responses) else str(best)
        return str(responses[0][0])

    def _store(self, scores: dict[str, float], name: str, value: Any) -> None:
        if isinstance(value, list):
            entries = [_number(v) for v in value]
            if None not in entries:
                scores[name] = sum(entries) / len(entries) if entries else 0.0
                scores[f"{name}_count"] = float(len(entries))
                return
        elif (number := _number(value)) is not None:
            scores[name] = number
            return
        raise ProbeError(f"{self.where}: lm-eval metric {name!r} of task {self.task_name!r} "
                         f"gives per-document values of type {type(value).__name__}, which "
                         "this probe cannot store")

    def aggregate(self, scores: list[dict[str, float]], metric: str) -> float:
        count = f"{metric}_count"
        if count in scores[0]:  # a list per document: pool all entries
            return pooled_mean(scores, metric, count)
        aggregation = self._aggregations[metric.partition(",")[0]]
        return float(aggregation([s[metric] for s in scores]))


def _number(value: Any) -> float | None:
    """A per-document metric value as a float (bools and numpy scalars included), or None."""
    if isinstance(value, str | bytes):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _metric_name(metric: str, filter_name: str) -> str:
    return metric if filter_name == "none" else f"{metric},{filter_name}"


def _registry_name(fn: Any) -> str | None:
    return next((name for name, f in AGGREGATION_REGISTRY.items() if f is fn), None)
