"""`Workbench`: what one worker holds for the life of a study.

Built once from a spec: the parents are checked and held in memory, the probes are read
and validated, and one engine is started from the source parent. Everything a user could
have got wrong is found here, before any storage is touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluators.engines import Engine, HFEngine
from evaluators.engines.hf import resolve_dtype
from evaluators.engines.vllm_engine import (
    VLLMEngine,
    VLLMOptions,
    require_vllm,
    vllm_build,
    vllm_missing,
)
from evaluators.probes import Probe, build_probe
from evaluators.suite import ItemResult, ObjectiveDef, Suite, SuiteResult
from mergesearch.devices import resolve_device
from mergesearch.errors import SpecError
from merging import Materializer, MergeRecipe, Parents
from merging.materializer import WeightsHash
from merging.methods import get_method
from merging.parents import auto_placement
from search.space import SearchSpace
from search.spec import VLLM_ONLY, StudySpec, probe_where
from search.warm_start import warm_start_points

log = logging.getLogger(__name__)


def vllm_options(spec: StudySpec) -> VLLMOptions:
    """The spec's vLLM settings; the engine's seed defaults to the study's."""
    engine = spec.engine
    settings = engine.model_dump(include=set(VLLM_ONLY))
    settings["seed"] = spec.seed if engine.seed is None else engine.seed
    dtype = str(resolve_dtype(engine.dtype, "cuda")).removeprefix("torch.")
    return VLLMOptions(dtype=dtype, **settings)


def engine_kind(spec: StudySpec) -> str:
    """hf or vllm: `auto` is vllm where it is installed, runs on this machine and on the
    spec's device."""
    engine = spec.engine
    if engine.kind == "hf":
        return "hf"
    why, build = vllm_missing(), vllm_build()
    if not why and engine.device not in ("auto", build):
        why = (f"engine.device is {engine.device} and the installed vLLM is its {build} "
               "build (engine.device auto runs it there)",)
    if engine.kind == "vllm":
        require_vllm(why)
        return "vllm"
    log.info("engine kind auto: %s", f"hf, since {why[0]}" if why else "vllm")
    return "hf" if why else "vllm"


def start_engine(spec: StudySpec, model_dir: Path, parents: Parents | None = None,
                 materializer: Materializer | None = None, kind: str | None = None) -> Engine:
    """The spec's engine (of `kind`, resolved from the spec when not given) on `model_dir`;
    with `parents` (and their `materializer`) it can load recipes. A vLLM engine reads the
    parents itself, inside its worker processes."""
    engine = spec.engine
    if (kind or engine_kind(spec)) == "vllm":
        whole = any(not get_method(m).elementwise for m in spec.merge.methods)
        return VLLMEngine(model_dir, vllm_options(spec),
                          parents=parents.folders if parents else None,
                          placement=engine.parents, whole_tensor_merges=whole)
    return HFEngine(model_dir, device=engine.device, dtype=engine.dtype,
                    batch_size=engine.batch_size, materializer=materializer)


def build_suite(spec: StudySpec) -> Suite:
    probes: dict[str, Probe] = {
        p.name: build_probe(p, probe_where(spec, i)) for i, p in enumerate(spec.probes)
    }
    for i, objective in enumerate(spec.objectives):
        for name in objective.probes:
            metrics = probes[name].metrics
            if objective.metric is not None and objective.metric not in metrics:
                raise SpecError(f"objectives[{i}].metric: probe {name!r} has no metric "
                                f"{objective.metric!r} (it has {', '.join(metrics)})")
    objectives = [ObjectiveDef(o.name, tuple(o.probes), o.metric, o.direction)
                  for o in spec.objectives]
    return Suite(probes, objectives)


@dataclass
class Workbench:
    spec: StudySpec
    parents: Parents
    materializer: Materializer
    suite: Suite
    space: SearchSpace
    engine: Engine
    warm_starts: dict[str, dict[str, float]]

    @classmethod
    def prepare(cls, spec: StudySpec) -> Workbench:
        suite = build_suite(spec)
        folders = {p.name: p.path for p in spec.parents}
        kind = engine_kind(spec)
        if kind == "vllm":
            placement = "mmap"  # vLLM's workers hold the parents; here only the layout is read
        else:
            device = resolve_device(spec.engine.device, "engine.device")
            placement = spec.engine.parents
            if placement == "auto":
                placement = auto_placement(folders, device)
            placement = device if placement == "device" else placement
        parents = Parents(folders, placement)
        materializer = Materializer(parents)
        space = SearchSpace(spec, parents.layout)
        warm_starts = warm_start_points(spec, space, parents)
        engine = start_engine(spec, spec.source_parent.path, parents, materializer, kind)
        return cls(spec, parents, materializer, suite, space, engine, warm_starts)

    @property
    def engine_name(self) -> str:
        """What scored, as the evaluations table records it: `hf:cpu:float32`."""
        dtype = str(self.engine.dtype).removeprefix("torch.")
        kind = "vllm" if isinstance(self.engine, VLLMEngine) else "hf"
        return f"{kind}:{torch.device(self.engine.device)}:{dtype}"

    def weights_attrs(self, digest: str) -> dict[str, str]:
        """What a trial records about its merged weights, so that an export can prove it
        rebuilt the same bytes (bytes can be compared only when merged on the same kind of
        device: arithmetic and random masks differ between a CPU and a GPU)."""
        return {"weights_sha256": digest,
                "weights_dtype": str(self.engine.dtype).removeprefix("torch."),
                "weights_device": torch.device(self.engine.device).type,
                "weights_hash_format": WeightsHash.FORMAT}

    def score(self, recipe: MergeRecipe, split: str,
              on_items: Callable[[list[ItemResult]], None] | None = None
              ) -> tuple[str, SuiteResult]:
        """Load the recipe into the engine and evaluate it; return (weights hash, result).
        `on_items` sees each chunk's results as they come (and may stop the trial)."""
        weights_hash = self.engine.load_recipe(recipe)  # hf: hashed while the suite runs
        result = self.suite.evaluate(self.engine, split, self.spec.evaluation.chunk_size,
                                     on_items)
        return weights_hash.hexdigest(), result

    def item_value(self, item: ItemResult) -> float:
        """An item's share of the study's value (what pruning compares between trials): its
        score in each objective's metric, over the objective's probes, weighted and signed
        as `combine: weighted` does."""
        value = 0.0
        for o in self.spec.objectives:
            if item.probe in o.probes:
                metric = o.metric or self.suite.probes[item.probe].default_metric
                value += self.spec.coefficient(o) * item.scores[metric] / len(o.probes)
        return value

    @property
    def items_per_trial(self) -> int:
        return sum(len(p.items("dev")) for p in self.suite.probes.values())

    def objectives(self, result: SuiteResult) -> dict[str, float]:
        return {o.name: result.objectives[o.name] for o in self.spec.objectives}

    def recover(self) -> None:
        """After a failed trial: give back what it held on the GPU (an out-of-memory error
        leaves the allocator's cache full)."""
        if isinstance(self.engine, VLLMEngine):
            self.engine.release_cache()
        elif torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        self.engine.close()
