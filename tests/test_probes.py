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
