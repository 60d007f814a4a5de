from pathlib import Path

import pytest
import torch

from evaluators.engines import GenerationRequest, HFEngine
from merging import Materializer, MergeRecipe, Parents


def test_batched_greedy_generation_equals_one_by_one(parents):
    engine = HFEngine(parents["instruct"], device="cpu", batch_size=4)
    requests = [GenerationRequest(p, max_new_tokens=n) for p, n in [
        ("The lungs are clear.", 6), ("Tell me about sleep.", 6),
        ("Summarize the radiology findings. There is a small left pleural effusion.", 3),
        ("Hi", 5), ("Write a short note about walking and cycling and swimming.", 6),
    ]]
    batched = engine.generate(requests)
    assert batched == [engine.generate([r])[0] for r in requests]
    assert all(isinstance(text, str) for text in batched)


def test_chat_template_wraps_prompts(parents):
    engine = HFEngine(parents["instruct"], device="cpu")
    text = engine.format(GenerationRequest("hello", system="be brief"))
    assert text == "<|system|>\nbe brief<|end|>\n<|user|>\nhello<|end|>\n<|assistant|>\n"
    assert engine.format(GenerationRequest("hello", chat=False)) == "hello"


def test_load_recipe_changes_outputs_and_back(parents):
    materializer = Materializer(Parents({k: parents[k] for k in ("clinical", "instruct")}))
    engine = HFEngine(parents["instruct"], device="cpu", materializer=materializer)
    before = engine.model.model.norm.weight.clone()
    recipe = MergeRecipe("linear", ("clinical", "instruct"),
                         {"clinical": {"weight": 1.0}, "instruct": {"weight": 0.0}})
    engine.load_recipe(recipe)
    torch.testing.assert_close(engine.model.model.norm.weight,
                               materializer.parents.tensor("clinical", "model.norm.weight"))
    engine.load_recipe(MergeRecipe("linear", ("clinical", "instruct"),
                                   {"clinical": {"weight": 0.0}, "instruct": {"weight": 1.0}}))
    torch.testing.assert_close(engine.model.model.norm.weight, before, rtol=0, atol=0)


def test_loglikelihood_is_the_sum_of_continuation_token_logprobs(parents):
    from evaluators.engines import LoglikelihoodRequest

    engine = HFEngine(parents["instruct"], device="cpu", batch_size=3)
    requests = [LoglikelihoodRequest("The lungs are", " clear."),
                LoglikelihoodRequest("Findings: small effusion. Impression: ", "effusion"),
                LoglikelihoodRequest("Hi", " there, how are you today?"),
                LoglikelihoodRequest("Answer:", " yes"), LoglikelihoodRequest("Answer:", " no")]
    batched = engine.loglikelihood(requests)
    for (logprob, greedy), request in zip(batched, requests, strict=True):
        alone = engine.loglikelihood([request])[0]  # no padding: the batch must not matter
        assert logprob == pytest.approx(alone[0], abs=1e-4) and greedy == alone[1]
    tokenizer = engine.tokenizer
    context, continuation = "The lungs are", " clear."
    whole = tokenizer(context + continuation, return_tensors="pt")["input_ids"]
    n = whole.shape[1] - len(tokenizer(context)["input_ids"])
    logprobs = engine.model(whole).logits[0].log_softmax(-1)
    expected = sum(logprobs[p - 1, whole[0, p]].item() for p in range(whole.shape[1] - n,
                                                                        whole.shape[1]))
    assert batched[0][0] == pytest.approx(expected, abs=1e-4)


DEMO_INSTRUCT = Path(__file__).parents[1] / "search/demo/assets/models/instruct"


def test_greedy_flag_and_stop_strings():
    """On the demo's trained model, whose greedy outputs are words that re-tokenize alike."""
    from evaluators.engines import LoglikelihoodRequest

    engine = HFEngine(DEMO_INSTRUCT, device="cpu")
    prompt = GenerationRequest("Tell me about sleep.", max_new_tokens=16)
    free = engine.generate([prompt])[0]
    words = free.split()
    assert len(words) >= 4
    text = engine.format(prompt)
    assert engine.loglikelihood([LoglikelihoodRequest(text, " ".join(words[:3]))])[0][1]
    assert not engine.loglikelihood([LoglikelihoodRequest(text, "zebra zebra")])[0][1]
    stop = words[2]
    stopped = engine.generate([GenerationRequest(prompt.prompt, 16, stop=(stop,))])
    assert stopped[0] == free[: free.index(stop)].strip()
    # A stop string spanning the prompt's end and the output's start is not in the output.
    across = "\n" + free[:3]
    assert text.endswith("\n") and across not in free
    assert engine.generate([GenerationRequest(prompt.prompt, 16, stop=(across,))]) == [free]


def test_few_shot_examples_become_turns_or_text(parents):
    engine = HFEngine(parents["instruct"], device="cpu")
    shots = (("Findings: clear lungs.", "Normal chest."),)
    chat = engine.format(GenerationRequest("Findings: effusion.", examples=shots))
    assert chat.index("clear lungs") < chat.index("Normal chest.") < chat.index("effusion")
    assert chat.count("<|user|>") == 2 and chat.count("<|assistant|>") == 2
    plain = engine.format(GenerationRequest("Findings: effusion.", examples=shots, chat=False))
    assert plain == "Findings: clear lungs.\nNormal chest.\n\nFindings: effusion."


def test_prompts_longer_than_the_positions_are_cut_from_the_left(parents):
    engine = HFEngine(parents["instruct"], device="cpu")
    request = GenerationRequest("lungs clear " * 2000 + "Impression:", max_new_tokens=8,
                                chat=False)
    ids = engine.encode(request)
    assert len(ids) == engine.max_length - 8
    assert engine.tokenizer.decode(ids).endswith("Impression:")
    assert isinstance(engine.generate([request])[0], str)
