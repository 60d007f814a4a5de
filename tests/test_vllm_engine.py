"""The vLLM engine's parts that need no running engine: the spec's engine settings, the one
error when vLLM is missing or broken (and `kind: auto` falling back to hf then), the
memory plan on a GPU and on the CPU, and the footprint it is made from. The engine itself
runs in tests/test_vllm_live.py."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from evaluators.engines.memory_plan import CPU_KV, GiB, ModelFootprint, _problems, plan_memory
from evaluators.engines.vllm_engine import WORKER_EXTENSION, VLLMOptions, vllm_build
from mergesearch.errors import SpecError
from search.spec import load_spec, parse_spec
from search.workbench import vllm_options
from tests.test_bad_input import assert_refused

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ spec and missing vLLM

def _launch_with_broken_vllm(spec: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`mergesearch launch` with a `vllm` package first on the path that fails to import, as
    an install built for another torch does."""
    broken = tmp_path / "broken" / "vllm"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('built for another torch')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken.parent), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "search.cli", "launch", str(spec),
                           "--n-trials", "1", "--no-test"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_a_broken_vllm_is_one_clear_error_and_nothing_is_written(write_spec, tmp_path):
    done = _launch_with_broken_vllm(write_spec(engine={"kind": "vllm"}), tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "error: engine.kind vllm cannot run here: vLLM is installed but does not import: "
        "ImportError: built for another torch. Use engine kind hf (or auto) on this machine")
    assert not (tmp_path / "study.db").exists()


def test_engine_kind_auto_runs_hf_where_vllm_cannot_run(write_spec, tmp_path):
    done = _launch_with_broken_vllm(write_spec(engine={"kind": "auto", "device": "cpu",
                                                       "batch_size": 8}), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "scored by the hf:cpu:float32 engine" in done.stdout
    assert "engine kind auto: hf, since vLLM is installed but does not import" in done.stderr


def test_a_kv_cache_that_cannot_hold_one_sequence_is_refused_before_vllm_starts(
        cli, write_spec, tmp_path):
    spec = write_spec(engine={"kind": "vllm", "kv_cache_memory_bytes": 4096})
    err = assert_refused(cli, tmp_path, spec, "engine: the vLLM engine does not fit",
                         "but one sequence of", "kv_cache_memory_bytes")
    assert err.count("\n") == 1  # one line


def test_a_device_the_installed_vllm_does_not_run_on_is_refused(cli, write_spec, tmp_path):
    other = "cpu" if vllm_build() == "cuda" else "cuda"
    err = assert_refused(cli, tmp_path, write_spec(engine={"kind": "vllm", "device": other}),
                         f"engine.kind vllm cannot run here: engine.device is {other} and "
                         f"the installed vLLM is its {vllm_build()} build")
    assert err.count("\n") == 1


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
    with pytest.raises(SpecError, match="use auto, cuda or cpu"):
        load_spec(write_spec(engine={"kind": "vllm", "device": "cuda:1"}))
    # auto may become either kind, so it takes the settings of both
    load_spec(write_spec(engine={"kind": "auto", "batch_size": 8, "max_model_len": 256}))


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


# ------------------------------------------------------------------ memory plan on the CPU

FREE = 20 * GiB


def test_the_cpu_backend_gets_a_kv_cache_in_bytes_and_parents_in_memory():
    small = ModelFootprint(weights=300 * 2**20, largest=40 * 2**20, kv_per_token=36864,
                           max_positions=2048)
    plan = plan_memory(FREE, small, 1200 * 2**20, 3, device="cpu")
    assert plan.placement == "memory" and plan.parents == 1200 * 2**20
    assert plan.kv_cache_memory_bytes == CPU_KV and plan.gpu_memory_utilization is None
    assert VLLMOptions().llm_kwargs(Path("/m"), plan)["kv_cache_memory_bytes"] == CPU_KV
    assert plan.summary().startswith("this machine's free memory of 20.0 GiB")
    # a device or pinned placement means host memory on the CPU
    assert plan_memory(FREE, small, 2**30, 2, placement="pinned", device="cpu"
                       ).placement == "memory"


def test_8b_parents_are_mapped_on_a_cpu_that_cannot_hold_them():
    plan = plan_memory(28 * GiB, LLAMA_8B, PARENTS_8B, 2, max_model_len=4096,
                       whole_tensor_merges=False, device="cpu")
    assert plan.placement == "mmap" and plan.parents == 0
    # what is left is shared: half to the KV cache, at least one sequence of 4096 tokens
    assert plan.kv_min <= plan.kv_cache < CPU_KV


def test_a_cpu_engine_that_cannot_fit_fails_with_the_numbers():
    with pytest.raises(SpecError) as e:
        plan_memory(40 * GiB, LLAMA_8B, PARENTS_8B, 2, placement="memory", max_model_len=4096,
                    whole_tensor_merges=False, device="cpu")
    message = str(e.value)
    assert "this machine's free memory is 40.0 GiB but the engine needs" in message
    assert "parents held in memory 29.9 GiB" in message and "engine.parents: mmap" in message
    with pytest.raises(SpecError, match=r"one sequence of 131072 tokens needs 16.0 GiB; set "
                       r"engine.max_model_len lower or give vLLM more memory "
                       r"\(engine.kv_cache_memory_bytes\)"):
        plan_memory(64 * GiB, LLAMA_8B, PARENTS_8B, 2, placement="mmap",
                    kv_cache_memory_bytes=8 * GiB, device="cpu")
    with pytest.raises(SpecError, match="sizes its KV cache in bytes; set "
                       "engine.kv_cache_memory_bytes instead"):
        plan_memory(FREE, LLAMA_8B, PARENTS_8B, 2, gpu_memory_utilization=0.5, device="cpu")
