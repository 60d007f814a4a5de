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
