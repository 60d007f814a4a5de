"""The memory plan of a vLLM engine that keeps parents beside it.

On a GPU, vLLM takes a share of each GPU for the live model, activations and the KV cache
(its `gpu_memory_utilization`, or the model plus `kv_cache_memory_bytes`). Parents held on
the GPU and the merge's scratch must fit in what is left. On the CPU backend all of it lives
in host memory, the KV cache is always sized in bytes, and the parents are held in memory or
mapped from their files. The plan is made from the checkpoints' headers and config before
anything is loaded, so a study that cannot fit fails before it starts, with the numbers;
and when the user gives no size, the plan picks one.

`ACTIVATIONS` and `CONTEXT` are estimates (vLLM profiles the real activation peak when it
starts), so a plan that fits by less than them may still fail inside vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mergesearch.errors import SpecError
from merging.parents import num_hidden_layers, read_config, tensor_shapes

GiB = 2**30
ACTIVATIONS = 2 * GiB  # vLLM's activation peak, CUDA graphs and sampler, per GPU
CONTEXT = 1 * GiB      # CUDA contexts and allocator slack outside vLLM's share, per GPU
MIN_KV = 4 * GiB       # parents leave the GPU (auto placement) rather than starve the cache
DEFAULT_SHARE = 0.92   # vLLM's own default gpu_memory_utilization
CPU_KV = 4 * GiB       # the CPU backend's default KV cache at most (vLLM's own default there)
CPU_KV_SEQUENCES = 256  # nor more than this many full sequences (vLLM's max_num_seqs)
HASH_PENDING = 4       # merged tensors the worker holds for hashing at most
# float32 copies of the largest tensor a whole-tensor merge holds at once besides the
# parents' (TIES: base, deltas, magnitudes, masks, signs, sums, the result): read off
# merging/methods/task_arithmetic.py and sparsify.py, not measured
WHOLE_TENSOR_COPIES = 6


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class ModelFootprint:
    """Sizes that decide memory, for all tensor-parallel ranks together."""

    weights: int       # bytes of the live model in the engine's dtype
    largest: int       # elements of the largest tensor
    kv_per_token: int  # bytes of KV cache per token, in the engine's dtype
    max_positions: int
    dtype_bytes: int = 2

    @classmethod
    def of(cls, folder: Path, dtype_bytes: int) -> ModelFootprint:
        config = read_config(folder)
        config = config.get("text_config") or config
        sizes = [math.prod(shape) for _, shape in tensor_shapes(folder).values()]
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        kv_heads = config.get("num_key_value_heads") or heads
        return cls(weights=sum(sizes) * dtype_bytes, largest=max(sizes),
                   kv_per_token=2 * num_hidden_layers(config) * kv_heads * head_dim * dtype_bytes,
                   max_positions=int(config.get("max_position_embeddings") or 2048),
                   dtype_bytes=dtype_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU (or of host memory, on the CPU), and the settings that give them."""

    total: int
    model: int
    parents: int  # parents resident on this GPU (0 when they stay in host memory)
    scratch: int
    kv_min: int   # one sequence of max_model_len tokens
    share: int    # vLLM's: model, activations and KV cache
    placement: str
    gpu_memory_utilization: float | None
    kv_cache_memory_bytes: int | None
    device: str = "cuda"

    @property
    def kv_cache(self) -> int:
        return self.share - self.model - ACTIVATIONS

    @property
    def memory(self) -> str:
        return "a GPU" if self.device == "cuda" else "this machine's free memory"

    def summary(self) -> str:
        return (f"{self.memory} of {gib(self.total)}: model {gib(self.model)}, KV cache about "
                f"{gib(self.kv_cache)}, activations {gib(ACTIVATIONS)}, parents "
                f"{gib(self.parents)} ({self.placement}), merge scratch {gib(self.scratch)}")


def plan_memory(total: int, footprint: ModelFootprint, parents_bytes: int, n_parents: int, *,
                placement: str = "auto", whole_tensor_merges: bool = True,
                tensor_parallel_size: int = 1,
                max_model_len: int | None = None, gpu_memory_utilization: float | None = None,
                kv_cache_memory_bytes: int | None = None, device: str = "cuda") -> MemoryPlan:
    """Fit the engine, the parents (`parents_bytes`, all of them, held whole by every rank
    when on the GPU) and the merge's scratch on each GPU of `total` bytes, or raise a
    `SpecError` that gives every figure and what to change. `whole_tensor_merges`: some
    method of the study merges whole tensors in float32 (elementwise ones work in chunks).
    `device` cpu: `total` is the free host memory, which vLLM's CPU backend, the parents held
    in memory and the scratch share. With no parents (an engine that only evaluates) there
    is no merge and no scratch."""
    tp = tensor_parallel_size
    model = footprint.weights // tp
    length = max_model_len or footprint.max_positions
    kv_min = footprint.kv_per_token * length // tp
    # The merged tensor and those the hash holds; a whole-tensor merge also holds float32
    # copies of the largest tensor (each parent's and its own temporaries).
    scratch = footprint.largest * (1 + HASH_PENDING) * footprint.dtype_bytes if n_parents else 0
    if whole_tensor_merges and n_parents:
        scratch += footprint.largest * 4 * (n_parents + WHOLE_TENSOR_COPIES)

    if device == "cpu":
        chosen = _plan_host(total, model, parents_bytes, scratch, kv_min, placement,
                            gpu_memory_utilization, kv_cache_memory_bytes)
    else:
        chosen = _plan_gpu(total, model, parents_bytes, scratch, kv_min, length, placement,
                           gpu_memory_utilization, kv_cache_memory_bytes)
    problems = _problems(chosen, length)
    if problems:
        raise SpecError("engine: the vLLM engine does not fit: " + "; ".join(problems))
    return chosen


def _plan_gpu(total: int, model: int, parents_bytes: int, scratch: int, kv_min: int,
              length: int, placement: str, gpu_memory_utilization: float | None,
              kv_cache_memory_bytes: int | None) -> MemoryPlan:
    """A GPU's plan: vLLM's share as the user sized it, or what is left once the parents (on
    the GPU where they leave a cache of at least MIN_KV, else pinned) and scratch fit."""

    def plan(where: str) -> MemoryPlan:
        on_gpu = parents_bytes if where == "device" else 0
        utilization = gpu_memory_utilization
        if kv_cache_memory_bytes is not None:
            share = model + ACTIVATIONS + kv_cache_memory_bytes
        elif utilization is not None:
            share = int(utilization * total)
        else:
            free = total - CONTEXT - on_gpu - scratch
            utilization = min(DEFAULT_SHARE, math.floor(100 * free / total) / 100)
            share = int(utilization * total)
        return MemoryPlan(total, model, on_gpu, scratch, kv_min, share, where,
                          utilization if kv_cache_memory_bytes is None else None,
                          kv_cache_memory_bytes)

    if placement == "auto":
        on_device = plan("device")
        # Where the plan sizes vLLM's share, parents give way to a cache of at least MIN_KV;
        # where the user sized it, moving them gains the cache nothing.
        enough = MIN_KV if gpu_memory_utilization is None and kv_cache_memory_bytes is None \
            else 0
        fits = not _problems(on_device, length) and on_device.kv_cache >= enough
        return on_device if fits else plan("pinned")
    return plan(placement)


def _plan_host(total: int, model: int, parents_bytes: int, scratch: int, kv_min: int,
               placement: str, gpu_memory_utilization: float | None,
               kv_cache_memory_bytes: int | None) -> MemoryPlan:
    """The CPU backend's plan: the KV cache in bytes (CPU_KV, or less where memory is short or
    the model small, but one sequence at least), the parents in memory where they fit, else
    mapped."""
    if gpu_memory_utilization is not None:
        raise SpecError("engine.gpu_memory_utilization: vLLM's CPU backend sizes its KV cache "
                        "in bytes; set engine.kv_cache_memory_bytes instead")
    if placement == "auto":
        spare = total - model - ACTIVATIONS - max(kv_min, kv_cache_memory_bytes or 0) \
            - scratch - CONTEXT
        placement = "memory" if parents_bytes <= spare else "mmap"
    elif placement in ("device", "pinned"):
        placement = "memory"
    held = parents_bytes if placement == "memory" else 0
    kv = kv_cache_memory_bytes
    if kv is None:
        free = total - model - ACTIVATIONS - held - scratch - CONTEXT
        kv = max(kv_min, min(CPU_KV, free // 2, CPU_KV_SEQUENCES * kv_min))
    return MemoryPlan(total, model, held, scratch, kv_min, model + ACTIVATIONS + kv,
                      placement, None, kv, device="cpu")


def _problems(plan: MemoryPlan, length: int) -> list[str]:
    problems = []
    needed = plan.share + plan.parents + plan.scratch + CONTEXT
    if plan.device == "cpu" and needed > plan.total:
        problems.append(
            f"{plan.memory} is {gib(plan.total)} but the engine needs {gib(needed)}: the model "
            f"{gib(plan.model)} + activations {gib(ACTIVATIONS)} + KV cache "
            f"{gib(plan.kv_cache)} + parents held in memory {gib(plan.parents)} + merge "
            f"scratch {gib(plan.scratch)} + runtime {gib(CONTEXT)}; set engine.parents: "
            "mmap, a smaller engine.kv_cache_memory_bytes or engine.max_model_len")
    elif needed > plan.total:
        share = (f"gpu_memory_utilization {plan.gpu_memory_utilization:.2f}"
                 if plan.gpu_memory_utilization is not None else "model + activations + "
                 f"kv_cache_memory_bytes {gib(plan.kv_cache_memory_bytes or 0)}")
        problems.append(
            f"a GPU has {gib(plan.total)} but needs {gib(needed)}: vLLM's share "
            f"{gib(plan.share)} ({share}) + parents on the GPU {gib(plan.parents)} + merge "
            f"scratch {gib(plan.scratch)} + CUDA context {gib(CONTEXT)}; lower "
            "engine.gpu_memory_utilization, set engine.parents: pinned, or raise "
            "engine.tensor_parallel_size")
    if plan.kv_cache < plan.kv_min:
        problems.append(
            f"vLLM's share {gib(plan.share)} leaves {gib(max(plan.kv_cache, 0))} for the KV "
            f"cache after the model ({gib(plan.model)}) and activations ({gib(ACTIVATIONS)}), "
            f"but one sequence of {length} tokens needs {gib(plan.kv_min)}; set "
            "engine.max_model_len lower or give vLLM more memory (engine."
            + ("kv_cache_memory_bytes)" if plan.device == "cpu" else
               "gpu_memory_utilization or kv_cache_memory_bytes)"))
    return problems
