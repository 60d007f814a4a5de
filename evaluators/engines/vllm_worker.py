"""`MergeWorker`: the part of the vLLM engine that runs inside vLLM's worker processes.

vLLM adds this class to its worker's bases (`worker_extension_cls`), and `VLLMEngine` calls
its methods through `LLM.collective_rpc`, so only plain values (folder paths, the recipe as
JSON, a hash) cross the process boundary. It holds the parents, merges with the project's
`Materializer` on the worker's device, and hands the merged tensors, named as in the Hugging
Face checkpoint, to the worker's own `reload_weights` in checkpoint format. That is vLLM's
layer-wise reload: each layer is rebuilt in checkpoint layout, loaded through the model's
`load_weights` (fused qkv and gate/up projections, this rank's tensor-parallel shard),
processed as at start-up (the CPU backend repacks linear weights for oneDNN there and leaves
the parameters themselves empty, so a plain `load_weights` cannot write them), and copied back
into the storage the engine already runs on, so CUDA graphs and compiled code stay valid.
One path serves the GPU and the CPU. Every rank merges whole tensors and keeps its own shard,
which is what makes methods that need a whole tensor (slerp, TIES, DARE) correct under tensor
parallelism.

Nothing here imports vLLM; the worker gives `self.device`, `self.rank` and
`self.reload_weights`. Names carry a `mergesearch_` prefix so that they cannot shadow the
worker's own.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from evaluators.engines.memory_plan import HASH_PENDING
from mergesearch.errors import MergesearchError
from merging.materializer import Materializer, WeightsHash
from merging.parents import Parents, load_tensors
from merging.recipe import MergeRecipe


def _not_rotary(record: logging.LogRecord) -> bool:
    # A reload warns, for each layer, of every module it loaded nothing into; the rotary
    # embeddings hold no checkpoint tensor (vLLM keeps their cache as it was), so at each swap
    # that would be one false warning per layer.
    return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


class MergeWorker:
    # Given by vLLM's worker, whose bases this class joins: device, rank, reload_weights().
    # No names of the worker's are defined here, not even as stubs: they would shadow its own.
    mergesearch_materializer: Materializer
    mergesearch_torn: bool = False  # a swap failed halfway: the weights are no candidate

    def mergesearch_load_parents(self, folders: dict[str, str], placement: str) -> int:
        """Read the parents once; `placement` is `device` (this worker's GPU), `pinned`,
        `memory` or `mmap`. Returns the bytes they hold on the GPU."""
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            _not_rotary)
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
        self.mergesearch_reload(tensors)
        return digest.hexdigest() if digest is not None else None

    def mergesearch_reload(self, tensors) -> None:
        """Write checkpoint-named tensors into the live model; return once they are written
        (not merely queued on the GPU). A reload that fails after it began (out of memory
        mid-merge, say) leaves some layers of each candidate, and vLLM's reload state half
        set: every later swap is refused rather than scoring such a mix."""
        if self.mergesearch_torn:
            raise MergesearchError("an earlier swap failed halfway, so this vLLM engine holds "
                                   "a mix of two candidates; restart the study's worker")
        self.mergesearch_torn = True
        with torch.no_grad():
            self.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.mergesearch_torn = False

    def mergesearch_release_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def mergesearch_load_folder(self, folder: str) -> None:
        """Read a checkpoint from disk into the live model: what swapping a candidate costs
        when it is written out first (the benchmark's reload path)."""
        tensors = load_tensors(Path(folder))
        self.mergesearch_reload((n, t.to(self.device)) for n, t in tensors.items())
