"""The lm_eval probe: user tasks written here (local JSONL data, so all offline), run by
lm-eval over tiny engines; aggregates must equal lm-eval's own results."""

import json
import random
import re
from pathlib import Path

import lm_eval.tasks
import pytest
import yaml

from evaluators.data import hashed_split
from evaluators.engines import GenerationRequest, HFEngine
from evaluators.probes.ifeval_checks import instruction_results
from evaluators.probes.lm_eval_task import LmEvalProbe, LmEvalProbeConfig
from evaluators.suite import Suite
from mergesearch.errors import ProbeError
from merging import Materializer, MergeRecipe, Parents
from search.demo import synthetic
from tests.conftest import write_jsonl

WORDS = "lungs heart clear effusion small left right normal mild chest".split()
TEXT = "Question: {{question}}\nAnswer:"
IFEVAL_YAML = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"


def _task(folder: Path, name: str, data: Path, split: str = "test", **config) -> None:
    """A task YAML reading `data` as its `split`, caching the data set under `folder`."""
    spec = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {split: str(data)},
                               "cache_dir": str(folder / "hf_cache")},
            "test_split": split, **config}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    rng = random.Random(3)
    questions = [" ".join(rng.choices(WORDS, k=5)) for _ in range(24)]
    mc = write_jsonl(folder / "mc.jsonl", [
        {"question": q, "choices": ["yes", "no", "maybe"], "answer": i % 3}
        for i, q in enumerate(questions)])
    short = write_jsonl(folder / "short.jsonl", [
        {"question": q, "answer": rng.choice(WORDS)} for q in questions[:8]])
    mean = {"aggregation": "mean", "higher_is_better": True}
    _task(folder, "tiny_mc", mc, output_type="multiple_choice", doc_to_text=TEXT,
          doc_to_target="answer", doc_to_choice="{{choices}}",
          metric_list=[{"metric": "acc", **mean}, {"metric": "acc_norm", **mean}])
    _task(folder, "tiny_ll", short, output_type="loglikelihood", doc_to_text=TEXT,
          doc_to_target="answer",
          metric_list=[{"metric": "perplexity", "aggregation": "perplexity",
                        "higher_is_better": False}, {"metric": "acc", **mean}])
    rows = []
    for key in range(6):
        item = synthetic.instruction_item(rng)
        rows.append({"key": key, **{k: item[k] for k in ("prompt", "instruction_id_list",
                                                          "kwargs")}})
    # The built-in task's settings, over local data and with short generations.
    (folder / "local_ifeval.yaml").write_text(yaml.safe_dump({
        "include": str(IFEVAL_YAML), "task": "local_ifeval", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(write_jsonl(folder / "ifeval.jsonl",
                                                                    rows))},
                           "cache_dir": str(folder / "hf_cache")},
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": 12}}))
    return folder


@pytest.fixture(scope="module")
def engine(parents):
    return HFEngine(parents["instruct"], device="cpu")


def _probe(tasks: Path, task: str, **config) -> LmEvalProbe:
    return LmEvalProbe(LmEvalProbeConfig(name="x", kind="lm_eval", task=task,
                                         include_path=tasks, **config), "probes[0] (x)")


def _lm_eval_value(probe: LmEvalProbe, metric: str) -> float:
    name = metric if "," in metric else f"{metric},none"
    return probe.last_results["results"][probe.task_name][name]


def _assert_aggregates_match_lm_eval(probe: LmEvalProbe, results) -> None:
    scores = [s for _, s in results]
    for metric in probe.metrics:
        assert probe.aggregate(scores, metric) == pytest.approx(_lm_eval_value(probe, metric))


def test_items_are_the_task_docs_split_by_id(tasks):
    probe = _probe(tasks, "tiny_mc")
    dev, test = probe.items("dev"), probe.items("test")
    assert sorted(int(i.id) for i in dev + test) == list(range(24))
    assert all(hashed_split(i.id, 0.5) == "dev" for i in dev)
    assert all(hashed_split(i.id, 0.5) == "test" for i in test)
    assert dev[0].prompt.startswith("Question: ") and dev[0].prompt.endswith("\nAnswer:")
    assert probe.metrics == ("acc", "acc_norm") and probe.default_metric == "acc"
    limited = _probe(tasks, "tiny_mc", limit=3, metric="acc_norm")
    assert [i.id for i in limited.items("dev")] == [i.id for i in dev[:3]]
    assert len(limited.items("test")) == 3 and limited.default_metric == "acc_norm"


def test_multiple_choice_scores_match_lm_eval(tasks, engine):
    probe = _probe(tasks, "tiny_mc")
    items = probe.items("test")
    results = probe.run(engine, items)
    assert all(output in ("yes", "no", "maybe") for output, _ in results)
    assert {s["acc"] for _, s in results} <= {0.0, 1.0}
    _assert_aggregates_match_lm_eval(probe, results)
    # Each item's result is its own, whatever the order or size of the chunk.
    assert probe.run(engine, items[::-1]) == results[::-1]
    chunked = Suite({"x": probe}, []).evaluate(engine, "test", chunk_size=5)
    assert [r.scores for r in chunked.items] == [s for _, s in results]
    assert chunked.probes["x"]["acc"] == probe.aggregate([s for _, s in results], "acc")


def test_generation_goes_through_the_engine_with_the_task_settings(engine, tmp_path):
    questions = [" ".join(random.Random(i).choices(WORDS, k=4)) for i in range(8)]
    direct = engine.generate([GenerationRequest(f"Question: {q}\nAnswer:", max_new_tokens=6,
                                                chat=False, stop=("\n",)) for q in questions])
    # Half the answers are what the model says, the other half its first word.
    answers = [out if i % 2 else re.match(r"\W*(\w+)", out).group(1)
               for i, out in enumerate(direct)]
    data = write_jsonl(tmp_path / "gen.jsonl", [{"question": q, "answer": a}
                                                for q, a in zip(questions, answers, strict=True)])
    _task(tmp_path, "tiny_gen", data, output_type="generate_until", doc_to_text=TEXT,
          doc_to_target="answer", generation_kwargs={"until": ["\n"], "max_gen_toks": 6},
          metric_list=[{"metric": "exact_match", "aggregation": "mean",
                        "higher_is_better": True}],
          filter_list=[{"name": "none", "filter": [{"function": "take_first"}]},
                       {"name": "word", "filter": [
                           {"function": "regex", "regex_pattern": r"(\w+)"},
                           {"function": "take_first"}]}])
    probe = _probe(tmp_path, "tiny_gen")
    assert probe.metrics == ("exact_match", "exact_match,word")
    items = sorted(probe.items("dev") + probe.items("test"), key=lambda i: int(i.id))
    results = probe.run(engine, items)
    assert [output for output, _ in results] == direct
    assert [s["exact_match"] for _, s in results] == [float(i % 2) for i in range(8)]
    _assert_aggregates_match_lm_eval(probe, results)
    assert probe.aggregate([s for _, s in results], "exact_match") == 0.5


def test_a_run_after_new_weights_sees_them(tasks, parents):
    """No response or request cache: the same items give the loaded model's values."""
    materializer = Materializer(Parents({k: parents[k] for k in ("clinical", "instruct")}))
    engine = HFEngine(parents["instruct"], device="cpu", materializer=materializer)
    probe = _probe(tasks, "tiny_ll")
    items = probe.items("dev")
    instruct = probe.run(engine, items)
    _assert_aggregates_match_lm_eval(probe, instruct)

    def load(clinical: float) -> None:
        engine.load_recipe(MergeRecipe("linear", ("clinical", "instruct"), {
            "clinical": {"weight": clinical}, "instruct": {"weight": 1 - clinical}}))

    load(1.0)
    clinical = probe.run(engine, items)
    fresh = probe.run(HFEngine(parents["clinical"], device="cpu"), items)
    assert [float(o) for o, _ in clinical] == pytest.approx([float(o) for o, _ in fresh])
    assert all(float(a) != float(b) for (a, _), (b, _) in zip(instruct, clinical, strict=True))
    load(0.0)
    assert [float(o) for o, _ in probe.run(engine, items)] == \
        pytest.approx([float(o) for o, _ in instruct])


def test_chat_template_system_prompt_and_few_shot(tasks, engine, monkeypatch):
    contexts: list[str] = []
    real = engine.loglikelihood

    def spy(requests):
        contexts.extend(r.context for r in requests)
        return real(requests)

    monkeypatch.setattr(engine, "loglikelihood", spy)
    probe = _probe(tasks, "tiny_mc", apply_chat_template=True, system="Be brief.",
                   num_fewshot=2)
    items = probe.items("test")[:2]
    first = probe.run(engine, items)
    assert contexts[0].startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nQuestion: ")
    # lm-eval moves the template's closing newline into the continuation
    assert contexts[0].count("Question: ") == 3 and contexts[0].endswith("<|assistant|>")
    _assert_aggregates_match_lm_eval(probe, first)
    seen = list(contexts)
    contexts.clear()
    assert probe.run(engine, items) == first
    assert contexts == seen  # the same few-shot examples each run


def test_builtin_ifeval_runs_offline_from_a_local_file(tasks, engine):
    probe = _probe(tasks, "local_ifeval")
    assert probe.metrics == ("prompt_level_strict_acc", "inst_level_strict_acc",
                             "prompt_level_loose_acc", "inst_level_loose_acc")
    items = probe.items("dev") + probe.items("test")
    results = probe.run(engine, items)
    _assert_aggregates_match_lm_eval(probe, results)
    scores = [s for _, s in results]
    mean_of_items = sum(s["inst_level_strict_acc"] for s in scores) / len(scores)
    assert probe.aggregate(scores, "inst_level_strict_acc") != pytest.approx(mean_of_items)
    docs = [json.loads(line) for line in (tasks / "ifeval.jsonl").read_text().splitlines()]
    for item, (output, scores) in zip(items, results, strict=True):
        doc = docs[int(item.id)]
        assert scores["inst_level_strict_acc_count"] == len(doc["instruction_id_list"])
        expected = instruction_results(doc, output)
        assert scores["prompt_level_strict_acc"] == expected["prompt_level_strict_acc"]
    with pytest.raises(ProbeError, match="zero-shot"):
        _probe(tasks, "local_ifeval", num_fewshot=1)


def test_bad_tasks_are_probe_errors(tasks, tmp_path):
    with pytest.raises(ProbeError, match=r"probes\[0\] \(x\).task: lm-eval has no task "
                                         r"'tiny_mcq'; did you mean tiny_mc"):
        _probe(tasks, "tiny_mcq")
    with pytest.raises(ProbeError, match="'mmlu' is a group or tag of lm-eval tasks"):
        _probe(tasks, "mmlu")
    _task(tmp_path, "tiny_missing", tmp_path / "missing.jsonl", output_type="generate_until",
          doc_to_text="{{question}}", doc_to_target="answer")
    with pytest.raises(ProbeError, match=r"probes\[0\] \(x\): lm-eval task 'tiny_missing' "
                                         "could not be loaded"):
        _probe(tmp_path, "tiny_missing")
    _task(tmp_path, "tiny_rolling", tasks / "short.jsonl", output_type="loglikelihood_rolling",
          doc_to_text="", doc_to_target="question")
    with pytest.raises(ProbeError, match="rolling log-likelihoods"):
        _probe(tmp_path, "tiny_rolling")
    with pytest.raises(ProbeError, match="has no metric 'f1'"):
        _probe(tasks, "tiny_mc", metric="f1")


def test_the_adapter_scores_as_lm_evals_own_hf_model():
    """The same requests through our engine and through lm-eval's HFLM on one model: equal
    log-likelihoods, greedy flags and generations (chat contexts and stop strings included)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from evaluators.probes.lm_eval_task import EngineLM
    from tests.test_engine import DEMO_INSTRUCT

    engine = HFEngine(DEMO_INSTRUCT, device="cpu")
    ours = EngineLM(engine, 32)
    theirs = HFLM(pretrained=str(DEMO_INSTRUCT), device="cpu", dtype="float32", batch_size=4)
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is the chest clear?"}], tokenize=False,
        add_generation_prompt=True)
    pairs = [("Question: is it clear?\nAnswer:", " yes"), (chat, " maybe, the lungs"),
             (chat, "yes"), ("Answer: ", "yes"), ("Answer:\n\n", "yes")]
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    for mine, reference in zip(ours.loglikelihood(requests),
                               theirs.loglikelihood(requests, disable_tqdm=True), strict=True):
        assert mine[0] == pytest.approx(reference[0], abs=1e-3) and mine[1] == reference[1]
    generations = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 10}), i)
                   for i, c in enumerate(["Question: is it clear?\nAnswer:", chat,
                                          "Tell me about sleep."])]
    assert ours.generate_until(generations) == theirs.generate_until(generations,
                                                                     disable_tqdm=True)
