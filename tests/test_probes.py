import json

import pytest

from evaluators.data import hashed_split, read_records
from evaluators.probes import build_probe
from evaluators.probes.generation import GenerationProbeConfig
from evaluators.probes.ifeval_checks import (
    FALLBACK_NLTK_DATA,
    ensure_sentence_tokenizer,
    instruction_results,
)
from evaluators.probes.instruction import InstructionProbeConfig
from mergesearch.errors import ProbeError
from tests.conftest import write_jsonl


def test_records_from_jsonl_json_and_csv(tmp_path):
    rows = [{"id": "a", "input": "x", "reference": "y"}, {"id": "b", "input": "z",
                                                          "reference": "w"}]
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "keyed.json").write_text(json.dumps({r["id"]: {"input": r["input"]} for r in rows}))
    (tmp_path / "p.csv").write_text("id,input,reference\na,x,y\nb,z,w\n")
    assert read_records(jsonl, "f") == rows
    assert read_records(tmp_path / "p.json", "f") == rows
    assert read_records(tmp_path / "p.csv", "f") == rows
    assert read_records(tmp_path / "keyed.json", "f")[1] == {"id": "b", "input": "z"}


def test_empty_or_broken_files_name_the_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ProbeError, match=r"probes\[0\].*empty\.jsonl has no items"):
        read_records(tmp_path / "empty.jsonl", "probes[0]")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ProbeError, match=r"bad\.jsonl:2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl", "probes[0]")


def test_hashed_split_is_stable_and_near_the_fraction():
    splits = [hashed_split(f"item-{i}", 0.3) for i in range(2000)]
    assert splits == [hashed_split(f"item-{i}", 0.3) for i in range(2000)]
    assert 0.25 < splits.count("dev") / len(splits) < 0.35


def _generation(path, **kw):
    config = GenerationProbeConfig(kind="generation", name="g", path=path,
                                   fields={"input": "findings", "reference": "impression"},
                                   template="Findings: {{ findings }}", **kw)
    return build_probe(config, "probes[0]")


def test_generation_probe_builds_prompts_and_scores_rouge(probe_files):
    probe = _generation(probe_files["radiology"])
    assert len(probe.items("dev")) == 4 and len(probe.items("test")) == 4
    item = probe.items("dev")[0]
    assert item.request.prompt.startswith("Findings: ")
    assert probe.score(item, item.data["reference"])["rougeL"] == pytest.approx(1.0)
    assert probe.score(item, "unrelated words entirely")["rougeL"] == 0.0


def test_generation_probe_reports_a_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "findings": "x", "split": "dev"}])
    with pytest.raises(ProbeError, match="no field 'impression'"):
        _generation(path)


def test_items_without_a_split_are_split_by_id(tmp_path):
    rows = [{"id": str(i), "findings": "a", "impression": "b"} for i in range(40)]
    probe = _generation(write_jsonl(tmp_path / "p.jsonl", rows), limit=5)
    dev, test = probe.items("dev"), probe.items("test")
    assert len(dev) == len(test) == 5
    assert not {i.id for i in dev} & {i.id for i in test}


def _ifeval_probe(path):
    return build_probe(InstructionProbeConfig(kind="instruction", name="i", path=path), "probes[1]")


def test_instruction_probe_uses_lm_eval_scoring(tmp_path):
    doc = {"key": 1, "prompt": "Shout. Your entire response should be in English, and in all "
           "capital letters. Answer with less than 8 words.",
           "instruction_id_list": ["change_case:english_capital",
                                   "length_constraints:number_words"],
           "kwargs": [{}, {"relation": "less than", "num_words": 8}], "split": "dev"}
    probe = _ifeval_probe(write_jsonl(tmp_path / "i.jsonl", [doc, {**doc, "split": "test"}]))
    item = probe.items("dev")[0]
    both = probe.score(item, "WATER KEEPS THE BODY COOL AND HEALTHY")
    one = probe.score(item, "THE LUNGS ARE CLEAR AND THE HEART IS NORMAL")
    assert both["prompt_level_strict"] == 1.0 and both["inst_level_strict"] == 1.0
    assert one["prompt_level_strict"] == 0.0 and one["inst_level_strict"] == 0.5
    lm_eval = instruction_results(doc, "THE LUNGS ARE CLEAR AND THE HEART IS NORMAL")
    assert lm_eval["inst_level_strict_acc"] == [True, False]
    # Instruction-level accuracy pools instructions over items, as IFEval defines it.
    assert probe.aggregate([both, one, {**one, "inst_level_strict": 0.0,
                                        "n_instructions": 1.0}],
                           "inst_level_strict") == pytest.approx(3 / 5)


def test_unknown_ifeval_instruction_is_refused(tmp_path):
    doc = {"key": 1, "prompt": "p", "instruction_id_list": ["made:up"], "kwargs": [{}]}
    with pytest.raises(ProbeError, match="unknown IFEval instruction 'made:up'"):
        _ifeval_probe(write_jsonl(tmp_path / "i.jsonl", [doc]))


def test_sentence_checks_work_offline():
    """Without nltk's punkt_tab data the fallback splits sentences, abbreviations included."""
    from nltk.data import FileSystemPathPointer
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params

    assert ensure_sentence_tokenizer() in ("installed", "fallback")
    folder = FALLBACK_NLTK_DATA / "tokenizers/punkt_tab/english"
    params = load_punkt_params(FileSystemPathPointer(str(folder)))
    splitter = PunktSentenceTokenizer(params)
    text = "Dr. Smith saw the film, e.g. the new one. It was long. Was it good?"
    assert splitter.tokenize(text) == ["Dr. Smith saw the film, e.g. the new one.",
                                       "It was long.", "Was it good?"]
    doc = {"prompt": "p", "instruction_id_list": ["length_constraints:number_sentences"],
           "kwargs": [{"relation": "less than", "num_sentences": 3}]}
    assert instruction_results(doc, "Dr. Who came. He left.")["prompt_level_strict_acc"]
    assert not instruction_results(doc, "One. Two. Three.")["prompt_level_strict_acc"]


def _choice(path, **kw):
    from evaluators.probes.choice import ChoiceProbeConfig

    return build_probe(ChoiceProbeConfig(kind="choice", name="c", path=path, **kw), "probes[2]")


def test_choice_readers_turn_each_format_into_options_and_an_answer(tmp_path):
    pubmedqa = {str(1000 + i): {"QUESTION": f"Does drug {i} help?", "CONTEXTS": ["A.", "B."],
                                "final_decision": ("yes", "no", "maybe")[i % 3]}
                for i in range(6)}
    (tmp_path / "ori_pqal.json").write_text(json.dumps(pubmedqa))
    (tmp_path / "test_ids.json").write_text(json.dumps({"1001": "no", "1004": "no"}))
    probe = _choice(tmp_path / "ori_pqal.json", format="pubmedqa",
                    test_ids=tmp_path / "test_ids.json")
    assert sorted(i.id for i in probe.items("test")) == ["1001", "1004"]
    item = probe.items("dev")[0]
    assert item.prompt == "Abstract: A.\nB.\nQuestion: Does drug 0 help?\nAnswer:"
    assert [r.continuation for r in item.request] == [" yes", " no", " maybe"]
    assert item.data["answer"] == 0

    medqa = [{"question": f"Q{i}?", "options": {"A": "aa", "B": "bb", "C": "cc", "D": "dd"},
              "answer_idx": "C", "split": ("dev", "test")[i % 2]} for i in range(4)]
    item = _choice(write_jsonl(tmp_path / "medqa.jsonl", medqa), format="medqa").items("dev")[0]
    assert item.prompt == "Question: Q0?\nA. aa\nB. bb\nC. cc\nD. dd\nAnswer:"
    assert [r.continuation for r in item.request] == [" A", " B", " C", " D"]
    assert item.data["answer"] == 2

    medmcqa = [{"id": f"m{i}", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
                "cop": 4, "split": ("dev", "test")[i % 2]} for i in range(4)]
    probe = _choice(write_jsonl(tmp_path / "medmcqa.jsonl", medmcqa), format="medmcqa")
    assert probe.items("dev")[0].data["answer"] == 3
    assert probe.items("dev")[0].prompt.startswith("Question: Q?\nChoices:\nA. a\n")


def test_choice_scores_by_loglikelihood_with_lm_eval_metrics(tmp_path):
    """A fake-free check: a real tiny engine scores the options; acc follows the largest
    log-likelihood, acc_norm the largest per character, macro-F1 pools the classes."""
    from evaluators.engines import HFEngine
    from tests.test_engine import DEMO_INSTRUCT

    rows = [{"id": str(i), "question": "Is the chest x-ray normal?", "context": "Lungs clear.",
             "options": ["yes", "no", "maybe, the lungs might be abnormal"],
             "answer": i % 3, "split": "dev" if i < 6 else "test"} for i in range(8)]
    probe = _choice(write_jsonl(tmp_path / "yn.jsonl", rows), score_letters=False,
                    fields={"context": "context"},
                    template="{{ context }}\nQuestion: {{ question }}\nAnswer:")
    engine = HFEngine(DEMO_INSTRUCT, device="cpu")
    items = probe.items("dev")
    results = probe.run(engine, items)
    logprobs = [lp for lp, _ in engine.loglikelihood(items[0].request)]
    options = items[0].data["choices"]
    best = max(range(3), key=lambda i: logprobs[i])
    best_norm = max(range(3), key=lambda i: logprobs[i] / len(options[i]))
    for item, (output, scores) in zip(items, results, strict=True):
        assert output == options[best]
        assert scores["acc"] == float(best == item.data["answer"])
        assert scores["acc_norm"] == float(best_norm == item.data["answer"])
    scores = [s for _, s in results]
    # Always predicting one class of three, each class twice: F1 is 2·2/(6+2) for it, 0 else.
    assert probe.aggregate(scores, "macro_f1") == pytest.approx((2 * 2 / (6 + 2)) / 3)
    assert probe.aggregate(scores, "acc") == pytest.approx(2 / 6)


def test_choice_answer_must_be_among_the_options(tmp_path):
    rows = [{"id": "1", "question": "Q?", "options": ["a", "b"], "answer": "c"}]
    with pytest.raises(ProbeError, match=r"item 1: answer 'c' is not among its 2 options"):
        _choice(write_jsonl(tmp_path / "c.jsonl", rows))
    rows = [{"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0}]
    with pytest.raises(ProbeError, match=r"item 1: cop 0 is not among its 4 options"):
        _choice(write_jsonl(tmp_path / "m.jsonl", rows), format="medmcqa")


def test_generation_scores_bleu_and_takes_files_per_split_and_few_shot(tmp_path):
    def rows(prefix, n):
        return [{"id": f"{prefix}{i}", "findings": f"finding {prefix}{i}",
                 "impression": f"impression {prefix}{i}"} for i in range(n)]
    probe = _generation({"dev": write_jsonl(tmp_path / "dev.jsonl", rows("d", 5)),
                         "test": write_jsonl(tmp_path / "test.jsonl", rows("t", 3))},
                        fewshot=2, stop=["\n\n"])
    assert [i.id for i in probe.items("dev")] == ["d2", "d3", "d4"]  # d0, d1 are examples
    assert [i.id for i in probe.items("test")] == ["t0", "t1", "t2"]
    request = probe.items("test")[0].request
    assert request.examples == (("Findings: finding d0", "impression d0"),
                                ("Findings: finding d1", "impression d1"))
    assert request.stop == ("\n\n",)
    item = probe.items("test")[0]
    assert probe.score(item, "impression t0")["bleu"] == pytest.approx(1.0)
    assert probe.score(item, "nothing alike here")["bleu"] < 0.05


def test_template_naming_an_unknown_field_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "findings": "x", "impression": "y"}])
    config = GenerationProbeConfig(kind="generation", name="g", path=path,
                                   fields={"input": "findings", "reference": "impression"},
                                   template="{{ history }}: {{ findings }}")
    with pytest.raises(ProbeError, match=r"p\.jsonl: item 1: the template uses a field.*"
                                         r"'history'.*findings, id, impression"):
        build_probe(config, "probes[0]")


def test_a_split_with_no_items_is_refused(tmp_path):
    rows = [{"id": str(i), "findings": "a", "impression": "b", "split": "dev"} for i in range(3)]
    with pytest.raises(ProbeError, match=r"probes\[0\]: the probe has no test items"):
        _generation(write_jsonl(tmp_path / "p.jsonl", rows))


def test_instruction_aggregates_equal_lm_evals_own(probe_files):
    """Prompt-level means and pooled instruction-level accuracy, against lm-eval's own
    aggregation of its per-item results, on varied outputs."""
    probe = _ifeval_probe(probe_files["instructions"])  # makes the sentence splitter findable
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc

    items = probe.items("dev") + probe.items("test")
    outputs = ["HELLO THERE.", "hello, there", "* one\n* two\n* three", "P.S. done",
               "A long answer " * 40, "", "<<Title>>\nText.", "Is there anything else?"]
    scores = [probe.score(item, out) for item, out in zip(items, outputs, strict=True)]
    results = [instruction_results(item.data, out)
               for item, out in zip(items, outputs, strict=True)]
    for level in ("strict", "loose"):
        assert probe.aggregate(scores, f"prompt_level_{level}") == pytest.approx(
            sum(r[f"prompt_level_{level}_acc"] for r in results) / len(results))
        assert probe.aggregate(scores, f"inst_level_{level}") == pytest.approx(
            agg_inst_level_acc([r[f"inst_level_{level}_acc"] for r in results]))


def test_bertscore_with_a_local_encoder(tmp_path, parents):
    """Any local model folder serves as the encoder (here a tiny Llama built by the tests)."""
    rows = [{"id": str(i), "findings": "x", "impression": "small left pleural effusion",
             "split": ("dev", "test")[i % 2]} for i in range(4)]
    probe = _generation(write_jsonl(tmp_path / "p.jsonl", rows),
                        bertscore_model=parents["base"])
    assert "bertscore" in probe.metrics
    f1 = probe.bertscore.f1(["small left pleural effusion", "heart size is normal"],
                            ["small left pleural effusion"] * 2)
    assert f1[0] == pytest.approx(1.0, abs=1e-5) and f1[1] < f1[0]
    with pytest.raises(ProbeError, match="scoring model folder .*nowhere does not exist"):
        _generation(write_jsonl(tmp_path / "p.jsonl", rows), bertscore_model=tmp_path / "nowhere")


def test_wrong_ifeval_arguments_are_refused_when_the_probe_is_built(tmp_path):
    doc = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
           "kwargs": [{"num_words": 3}]}
    with pytest.raises(ProbeError, match=r"item 1: kwargs of 'punctuation:no_comma'.*num_words"):
        _ifeval_probe(write_jsonl(tmp_path / "i.jsonl", [doc]))


@pytest.mark.parametrize("doc,needle", [
    ({"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{}]},
     "kwargs of 'length_constraints:number_words' lack num_words, relation"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": ["x"]},
     "kwargs must be a list of one object per instruction"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": 3},
     "kwargs must be a list of one object per instruction"),
    ({"instruction_id_list": "punctuation:no_comma", "kwargs": [{}]},
     "instruction_id_list must be a non-empty list of ids"),
])
def test_malformed_ifeval_records_are_refused(tmp_path, doc, needle):
    path = write_jsonl(tmp_path / "i.jsonl", [{"key": 1, "prompt": "p", **doc}])
    with pytest.raises(ProbeError, match=r"item 1: " + needle):
        _ifeval_probe(path)


def test_templates_and_readers_fail_on_an_item_with_its_name(tmp_path):
    rows = [{"id": str(i), "findings": "x", "impression": "y", "self": "z", "split": split}
            for i, split in enumerate(("dev", "test"))]
    probe = _generation(write_jsonl(tmp_path / "ok.jsonl", rows))  # a column named `self`
    assert probe.items("dev")[0].prompt == "Findings: x"
    rows = rows[:1]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    config = GenerationProbeConfig(kind="generation", name="g", path=path,
                                   fields={"input": "findings", "reference": "impression"},
                                   template="{{ input + 1 }}")
    with pytest.raises(ProbeError, match=r"item 1: the template fails on this item"):
        build_probe(config, "probes[0]")
    pubmedqa = {"1": {"QUESTION": "Q?", "CONTEXTS": "one string", "final_decision": "yes"}}
    (tmp_path / "ori_pqal.json").write_text(json.dumps(pubmedqa))
    with pytest.raises(ProbeError, match=r"item 1: CONTEXTS must be a list of strings"):
        _choice(tmp_path / "ori_pqal.json", format="pubmedqa")


def test_choice_refuses_generation_settings_and_unmatched_test_ids(tmp_path):
    rows = [{"id": str(i), "question": "Q?", "options": ["a", "b"], "answer": 0}
            for i in range(4)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(ProbeError, match=r"probes\[2\]\.system: choice probes"):
        _choice(path, system="Be brief.")
    (tmp_path / "ids.txt").write_text("nope\n")
    with pytest.raises(ProbeError, match=r"no test items; check that the ids in .*ids\.txt"):
        _choice(path, test_ids=tmp_path / "ids.txt")
