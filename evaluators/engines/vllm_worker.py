"""`MergeWorker`: the part of the vLLM engine that runs inside vLLM's worker processes.

vLLM adds this class to its GPU worker's bases (`worker_extension_cls`), and `VLLMEngine`
calls its methods through `LLM.collective_rpc`, so only plain values (folder paths, the recipe
as JSON, a hash) cross the process boundary. It holds the parents, merges with the project's
`Materializer` on the worker's GPU, and writes through the live model's `load_weights`. That
copies each tensor, named as in the Hugging Face checkpoint, into the parameters vLLM
already has (fused qkv and gate/up projections, this rank's tensor-parallel shard) in place,
so CUDA graphs and compiled code keep pointing at valid memory. Every rank merges whole
tensors and keeps its own shard, which is what makes methods that need a whole tensor
(slerp, TIES, DARE) correct under tensor parallelism.

Nothing here imports vLLM; the worker gives `self.device`, `self.rank` and
`self.get_model()`. Names carry a `mergesearch_` prefix so that they cannot shadow the
worker's own.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from evaluators.engines.gpu_memory import HASH_PENDING
from mergesearch.errors import MergesearchError
from merging.materializer import Materializer, WeightsHash
from merging.parents import Parents, load_tensors
from merging.recipe import MergeRecipe


def load_into(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feed `tensors` to the model's `load_weights` and check that every parameter was
    written: a parameter left out would score a mix of two candidates."""
    with torch.no_grad():
        loaded = model.load_weights(tensors)
    if loaded is None:  # models whose loader does not report what it wrote
        return
    missing = sorted({name for name, _ in model.named_parameters()} - set(loaded))
    if missing:
        raise MergesearchError(
            f"the merge wrote none of the engine's parameter {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; the parents' tensor names do not cover the model the engine runs")


class MergeWorker:
    # Given by vLLM's worker, whose bases this class joins: device, rank, get_model(). No
    # names of the worker's are defined here, not even as stubs: they would shadow its own.
    mergesearch_materializer: Materializer

    def mergesearch_load_parents(self, folders: dict[str, str], placement: str) -> int:
        """Read the parents once; `placement` is `device` (this worker's GPU), `pinned`,
        `memory` or `mmap`. Returns the bytes they hold on the GPU."""
        where = str(self.device) if placement == "device" else placement
        parents = Parents({name: Path(folder) for name, folder in folders.items()}, where)
        self.mergesearch_materializer = Materializer(parents)
        if parents.device.type != "cuda":
            return 0
        return sum(t.numel() * t.element_size()
                   for tensors in parents.tensors.values() for t in tensors.values())

    def mergesearch_load_recipe(self, recipe_json: str, dtype: str,
                                hash_weights: bool = True) -> str | None:
        """Make the live model the recipe's merge. Rank 0 returns the weights' hash (the
        same as `Materializer.tensors` gives on export), when asked."""
        recipe = MergeRecipe.from_json(recipe_json)
        # a short queue: each pending tensor holds GPU memory the memory plan counts
        digest = WeightsHash(max_pending=HASH_PENDING) if hash_weights and self.rank == 0 \
            else None
        tensors = self.mergesearch_materializer.tensors(
            recipe, getattr(torch, dtype), digest, device=self.device)
        load_into(self.get_model(), tensors)
        if self.device.type == "cuda":  # return when the weights are written, not queued
            torch.cuda.synchronize(self.device)
        return digest.hexdigest() if digest is not None else None

    def mergesearch_release_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def mergesearch_load_folder(self, folder: str) -> None:
        """Read a checkpoint from disk into the live model: what swapping a candidate costs
        when it is written out first (the benchmark's reload path)."""
        tensors = load_tensors(Path(folder))
        load_into(self.get_model(), ((n, t.to(self.device)) for n, t in tensors.items()))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
