"""The vLLM engine's parts that run without vLLM or a GPU: the spec's engine settings, the
one error when vLLM or a GPU is missing, the memory plan, the worker extension's merge and
hash, and the scoring of prompt log-probabilities. vLLM itself runs only in the GPU scripts
under bench/gpu (docs/benchmarks.md has their output)."""

import ast
import importlib
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from evaluators.engines import HFEngine, LoglikelihoodRequest
from evaluators.engines.gpu_memory import GiB, ModelFootprint, _problems, plan_memory
from evaluators.engines.vllm_engine import (
    WORKER_EXTENSION,
    VLLMOptions,
    continuation_score,
    vllm_missing,
)
from evaluators.engines.vllm_worker import MergeWorker
from mergesearch.errors import MergesearchError, SpecError
from merging import Materializer, MergeRecipe, Parents
from merging.materializer import WeightsHash
from search.spec import load_spec, parse_spec
from search.workbench import vllm_options
from tests.test_bad_input import assert_refused

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ spec and missing vLLM

@pytest.mark.skipif(not vllm_missing(), reason="this machine has vLLM and a GPU")
def test_vllm_engine_without_vllm_or_gpu_is_one_clear_error(cli, write_spec, tmp_path):
    spec = write_spec(engine={"kind": "vllm"})
    err = assert_refused(cli, tmp_path, spec, "engine.kind vllm cannot run here")
    for missing in vllm_missing():
        assert missing in err
    assert err.count("\n") == 1  # one line


def test_settings_of_the_other_engine_kind_are_refused(write_spec):
    with pytest.raises(SpecError, match=r"engine: max_model_len, enforce_eager apply to "
                       r"engine kind vllm only, and this engine is hf"):
        load_spec(write_spec(engine={"device": "cpu", "max_model_len": 512,
                                     "enforce_eager": True}))
    with pytest.raises(SpecError, match="batch_size applies to engine kind hf only"):
        load_spec(write_spec(engine={"kind": "vllm", "batch_size": 8}))
    with pytest.raises(SpecError, match="not both"):
        load_spec(write_spec(engine={"kind": "vllm", "gpu_memory_utilization": 0.5,
                                     "kv_cache_memory_bytes": 2**30}))
    with pytest.raises(SpecError, match="CUDA_VISIBLE_DEVICES"):
        load_spec(write_spec(engine={"kind": "vllm", "device": "cuda:1"}))


def test_vllm_settings_reach_the_engine_options(write_spec):
    spec = load_spec(write_spec(engine={
        "kind": "vllm", "max_model_len": 4096, "gpu_memory_utilization": 0.5,
        "tensor_parallel_size": 2, "enable_prefix_caching": True, "seed": 7}))
    # the spec stored with a study (every field, defaults included) reads back the same
    assert parse_spec(spec.to_json_dict(), "stored") == spec
    kwargs = vllm_options(spec).llm_kwargs(Path("/m"), plan=None)
    assert kwargs == {"model": "/m", "tokenizer": "/m", "worker_extension_cls": WORKER_EXTENSION,
                      "dtype": "bfloat16", "max_model_len": 4096,
                      "gpu_memory_utilization": 0.5, "enforce_eager": False,
                      "tensor_parallel_size": 2, "seed": 7, "enable_prefix_caching": True}
    defaults = vllm_options(load_spec(write_spec(seed=11, engine={"kind": "vllm"})))
    assert defaults == VLLMOptions(dtype="bfloat16", seed=11)  # the study's seed


def test_worker_extension_path_names_the_class():
    module, name = WORKER_EXTENSION.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is MergeWorker


def test_only_the_vllm_engine_imports_vllm_and_only_when_it_starts():
    """Nothing else in the project imports vLLM; the engine's module imports it inside the
    engine's constructor, so importing the project never needs it."""
    importers = {}
    for path in ROOT.rglob("*.py"):
        if {".venv", "runs", "build"} & set(path.relative_to(ROOT).parts):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "vllm" or n.startswith("vllm.") for n in names):
                importers.setdefault(str(path.relative_to(ROOT)), []).append(node)
    assert set(importers) == {"evaluators/engines/vllm_engine.py"}
    engine_module = ast.parse((ROOT / "evaluators/engines/vllm_engine.py").read_text())
    top_level = {(n.lineno, n.col_offset) for n in engine_module.body}
    assert not any((n.lineno, n.col_offset) in top_level
                   for n in importers["evaluators/engines/vllm_engine.py"])


# ------------------------------------------------------------------ memory plan

# Llama-3.1-8B: 8.03e9 weights, an embedding of 128256 x 4096, 32 layers of 8 KV heads of 128.
LLAMA_8B = ModelFootprint(weights=8_030_261_248 * 2, largest=128256 * 4096,
                          kv_per_token=2 * 32 * 8 * 128 * 2, max_positions=131072)
PARENTS_8B = 2 * 8_030_261_248 * 2
H100 = int(79.1 * GiB)


def test_8b_parents_stay_on_an_h100_beside_the_engine():
    plan = plan_memory(H100, LLAMA_8B, PARENTS_8B, 2, max_model_len=8192)
    assert plan.placement == "device" and plan.parents == PARENTS_8B
    # what is left after parents, scratch and context goes to vLLM
    assert plan.gpu_memory_utilization == 0.34
    assert plan.kv_cache > 9 * GiB and not _problems(plan, 8192)
    # linear merges need no float32 scratch, which leaves room for a 128K-token sequence
    linear = plan_memory(H100, LLAMA_8B, PARENTS_8B, 2, whole_tensor_merges=False)
    assert linear.placement == "device" and linear.kv_cache > 16 * GiB
    assert linear.scratch < plan.scratch / 3


def test_parents_leave_a_small_gpu_for_pinned_memory():
    plan = plan_memory(int(47.5 * GiB), LLAMA_8B, PARENTS_8B, 2, max_model_len=8192)
    assert plan.placement == "pinned" and plan.parents == 0
    assert plan.kv_cache > 8 * GiB
    # 128K-token sequences (16 GiB of KV) leave no room for the parents on an H100 either
    assert plan_memory(H100, LLAMA_8B, PARENTS_8B, 2).placement == "pinned"


def test_a_share_the_user_sized_keeps_the_parents_on_the_gpu():
    plan = plan_memory(H100, LLAMA_8B, PARENTS_8B, 2, max_model_len=8192,
                       kv_cache_memory_bytes=2 * GiB)
    assert plan.placement == "device" and plan.kv_cache == 2 * GiB


def test_a_spec_that_cannot_fit_fails_with_the_numbers():
    with pytest.raises(SpecError) as e:
        plan_memory(H100, LLAMA_8B, PARENTS_8B, 2, placement="device",
                    gpu_memory_utilization=0.9)
    message = str(e.value)
    assert "a GPU has 79.1 GiB but needs" in message
    assert "gpu_memory_utilization 0.90" in message and "parents on the GPU 29.9 GiB" in message
    assert "engine.parents: pinned" in message
    with pytest.raises(SpecError, match=r"one sequence of 131072 tokens needs 16.0 GiB; set "
                       r"engine.max_model_len lower"):
        plan_memory(H100, LLAMA_8B, PARENTS_8B, 2, placement="pinned",
                    gpu_memory_utilization=0.4)
    assert plan_memory(H100, LLAMA_8B, PARENTS_8B, 2, placement="pinned",
                       gpu_memory_utilization=0.4, max_model_len=8192).kv_cache > 10 * GiB


def test_tensor_parallel_ranks_share_the_model_but_each_holds_the_parents():
    one = plan_memory(H100, LLAMA_8B, PARENTS_8B, 2, placement="device", max_model_len=8192)
    two = plan_memory(H100, LLAMA_8B, PARENTS_8B, 2, placement="device", max_model_len=8192,
                      tensor_parallel_size=2)
    assert two.model == one.model // 2 and two.parents == one.parents
    assert two.kv_min == one.kv_min // 2


def test_a_kv_cache_in_bytes_replaces_the_fraction():
    plan = plan_memory(H100, LLAMA_8B, PARENTS_8B, 2, max_model_len=8192,
                       kv_cache_memory_bytes=8 * GiB)
    assert plan.gpu_memory_utilization is None and plan.kv_cache == 8 * GiB
    assert VLLMOptions().llm_kwargs(Path("/m"), plan)["kv_cache_memory_bytes"] == 8 * GiB


def test_footprint_is_read_from_headers_and_config(parents):
    footprint = ModelFootprint.of(parents["instruct"], dtype_bytes=2)
    model = AutoModelForCausalLM.from_pretrained(parents["instruct"])
    tensors = model.state_dict()
    assert footprint.weights == 2 * sum(t.numel() for t in tensors.values())
    assert footprint.largest == max(t.numel() for t in tensors.values())
    config = model.config
    assert footprint.kv_per_token == (2 * config.num_hidden_layers * config.num_key_value_heads
                                      * config.hidden_size // config.num_attention_heads * 2)


# ------------------------------------------------------------------ the worker extension

class TransformersWorker(MergeWorker):
    """What the extension is given by vLLM's worker (`device`, `rank`, `get_model()`),
    hosting a transformers model whose `load_weights` copies each named tensor into the
    parameter of that name, as vLLM's loaders do for unfused parameters."""

    def __init__(self, model: torch.nn.Module, rank: int = 0, skip: str | None = None):
        self.device, self.rank, self.model = torch.device("cpu"), rank, model
        state = model.state_dict(keep_vars=True)

        def load_weights(weights):
            loaded = set()
            for name, tensor in weights:
                if name != skip:
                    state[name].data.copy_(tensor)
                    loaded.add(name)
            return loaded
        model.load_weights = load_weights

    def get_model(self) -> torch.nn.Module:
        return self.model


def _recipes():
    yield MergeRecipe("linear", ("clinical", "instruct"),
                      {"clinical": {"weight": {"layers.0": 0.2, "*": 0.7}},
                       "instruct": {"weight": 0.5}})
    yield MergeRecipe("dare_ties", ("clinical", "instruct"),
                      {"clinical": {"weight": 0.6, "density": 0.5},
                       "instruct": {"weight": 0.4, "density": 0.7}}, base="base", seed=3)


def test_worker_merges_two_recipes_in_turn_like_the_hf_engine(parents):
    folders = {name: str(parents[name]) for name in ("base", "clinical", "instruct")}
    worker = TransformersWorker(AutoModelForCausalLM.from_pretrained(parents["instruct"]))
    assert worker.mergesearch_load_parents(folders, "memory") == 0
    engine = HFEngine(parents["instruct"], device="cpu", materializer=Materializer(
        Parents({name: Path(folder) for name, folder in folders.items()})))
    for recipe in _recipes():
        digest = worker.mergesearch_load_recipe(recipe.to_json(), "float32")
        assert digest == engine.load_recipe(recipe).hexdigest()
        exported = WeightsHash()
        for _ in engine.materializer.tensors(recipe, torch.float32, exported):
            pass
        assert digest == exported.hexdigest()
        for name, tensor in worker.model.state_dict().items():
            assert torch.equal(tensor, engine.model.state_dict()[name]), name


def test_only_rank_zero_hashes(parents):
    worker = TransformersWorker(AutoModelForCausalLM.from_pretrained(parents["instruct"]),
                                rank=1)
    worker.mergesearch_load_parents({n: str(parents[n]) for n in ("clinical", "instruct")},
                                    "mmap")
    recipe = next(_recipes())
    assert worker.mergesearch_load_recipe(recipe.to_json(), "float32") is None


def test_a_parameter_the_merge_does_not_write_is_an_error(parents):
    worker = TransformersWorker(AutoModelForCausalLM.from_pretrained(parents["instruct"]),
                                skip="model.norm.weight")
    worker.mergesearch_load_parents({n: str(parents[n]) for n in ("clinical", "instruct")},
                                    "memory")
    with pytest.raises(MergesearchError, match="parameter 'model.norm.weight'"):
        worker.mergesearch_load_recipe(next(_recipes()).to_json(), "float32")


def test_worker_reads_a_checkpoint_from_disk(parents):
    worker = TransformersWorker(AutoModelForCausalLM.from_pretrained(parents["instruct"]))
    worker.mergesearch_load_folder(str(parents["clinical"]))
    clinical = AutoModelForCausalLM.from_pretrained(parents["clinical"]).state_dict()
    for name, tensor in worker.model.state_dict().items():
        assert torch.equal(tensor, clinical[name]), name


# ------------------------------------------------------------------ prompt log-probabilities

Logprob = namedtuple("Logprob", "logprob rank decoded_token")  # vLLM's fields


def _prompt_logprobs(model, tokens: list[int]) -> list:
    """What vLLM returns for a prompt with prompt_logprobs=1: None for the first token, then
    per position the prompt's own token with its rank (the number of tokens at least as
    likely), and the most likely token with rank 1, which replaces the prompt's own entry
    when they are the same token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float().log_softmax(-1)
    entries = [None]
    for position in range(1, len(tokens)):
        scores, token = logits[position - 1], tokens[position]
        top = int(scores.argmax())
        entries.append({token: Logprob(float(scores[token]),
                                       int((scores >= scores[token]).sum()), None),
                        top: Logprob(float(scores[top]), 1, None)})
    return entries


def test_prompt_logprobs_score_continuations_as_the_hf_engine_does(parents):
    engine = HFEngine(parents["instruct"], device="cpu")
    requests = [LoglikelihoodRequest("The lungs are", " clear."),
                LoglikelihoodRequest("Answer yes or no: is the heart enlarged?", " no"),
                LoglikelihoodRequest("", "Hello there")]
    expected = engine.loglikelihood(requests)
    for request, (logprob, greedy) in zip(requests, expected, strict=True):
        tokens, count = engine.continuation_tokens(request)
        got, got_greedy = continuation_score(_prompt_logprobs(engine.model, tokens), tokens,
                                             count)
        assert got == pytest.approx(logprob, abs=1e-4)
        assert got_greedy == greedy

