"""`StudySpec`: everything a study needs, read from one YAML file and validated.

Unknown keys are errors. Every error names the file, the line and the field, e.g.
`spec.yaml:14: probes[0].kind: ...`. Relative paths are taken from the spec's folder and
stored absolute, so the spec saved with a study is enough for a worker anywhere on the
same file system.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evaluators.probes import PROBE_KINDS, AnyProbeConfig
from mergesearch.errors import MergesearchError, SpecError
from merging.methods import get_method


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path


# per_module and per_layer_module are one thing (attention and MLP apart in every layer);
# anchors: `merge.anchors` control points across depth, interpolated to every layer.
Granularity = Literal["per_layer", "per_module", "per_layer_module", "anchors", "global"]


class ParamRange(_Strict):
    low: float
    high: float
    genes: Granularity | None = Field(None, description="default: merge.genes")

    @model_validator(mode="after")
    def _ordered(self) -> ParamRange:
        if not self.low < self.high:
            raise ValueError(f"low must be below high, not [{self.low}, {self.high}]")
        return self


ParamSetting = float | tuple[float, float] | ParamRange


class MergeSpec(_Strict):
    method: str | list[str] = Field(
        "linear", description="a merge method, or several: the study then chooses the method "
        "per trial, each with its own parameters")
    base: str | None = Field(None, description="parent the task vectors are taken from "
                             "(task-vector methods, slerp, model_stock)")
    genes: Granularity = "per_layer"
    anchors: int = Field(4, ge=2, description="control points across depth for genes: anchors")
    outer_genes: bool = Field(True, description="embed, final norm and lm_head as own genes")
    bounds: tuple[float, float] = Field((0.0, 1.0), description="range of weight and t")
    gene_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="range of weight and t for some genes (embed, norm, "
        "lm_head, layers.N, layers.N.attn, anchor.K): the most specific key wins")
    params: dict[str, ParamSetting] = Field(
        default_factory=dict, description="other method parameters: a number fixes one, "
        "[low, high] or {low, high, genes} searches it; with several methods a key applies to "
        "each method that has the parameter, and `METHOD.PARAM` to one method alone")
    source: str | None = Field(
        None, description="parent whose config, tokenizer and chat template the merge uses "
        "(default: the last parent with a chat template, else the last parent)"
    )
    warm_start: list[Path] = Field(
        default_factory=list, description="recipes tried first, beside the parents and their "
        "average: exported mergesearch_recipe.json files or mergekit YAML configs")

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    def params_for(self, method: str) -> dict[str, float | ParamRange]:
        """The parameter settings one method gets: the shared keys it has, overridden by
        its own `METHOD.PARAM` keys."""
        names = {p.name for p in get_method(method).params}
        shared = {k: v for k, v in self.params.items() if "." not in k and k in names}
        own = {k.split(".", 1)[1]: v for k, v in self.params.items()
               if k.startswith(f"{method}.")}
        return {**shared, **own}

    def base_for(self, method: str) -> str | None:
        """The base model a method merges against: none for methods that take no base
        (with several methods, those merge the other parents and leave the base out)."""
        return None if get_method(method).base == "ignored" else self.base

    @model_validator(mode="after")
    def _valid(self) -> MergeSpec:
        for key, (low, high) in [("", self.bounds), *self.gene_bounds.items()]:
            if not low < high:
                where = f"gene_bounds.{key}" if key else "bounds"
                raise ValueError(f"{where} must be [low, high] with low < high, not "
                                 f"{[low, high]}")
        methods = self.methods
        if not methods:
            raise ValueError("method: list at least one merge method")
        if len(set(methods)) < len(methods):
            raise ValueError(f"method: a method is listed twice ({', '.join(methods)})")
        try:
            for name in methods:
                get_method(name)
            self._check_param_keys(methods)
            for name in methods:
                self._check_method(name, several=len(methods) > 1)
        except MergesearchError as e:
            raise ValueError(str(e)) from None
        return self

    def _check_param_keys(self, methods: list[str]) -> None:
        for key, value in self.params.items():
            if isinstance(value, tuple):
                self.params[key] = ParamRange(low=value[0], high=value[1])
            method, _, name = key.rpartition(".")
            if method and method not in methods:
                raise MergesearchError(f"params.{key}: {method!r} is not a listed method "
                                       f"({', '.join(methods)})")
            if name in ("weight", "t"):
                raise MergesearchError(f"params.{key}: set its range with merge.bounds")
            owners = [method] if method else methods
            if len(owners) == 1:
                get_method(owners[0]).param(name)  # says which parameters it takes
            elif not any(name in {p.name for p in get_method(m).params} for m in owners):
                raise MergesearchError(f"params.{key}: none of the methods "
                                       f"({', '.join(owners)}) has a parameter {name!r}")

    def _check_method(self, name: str, several: bool) -> None:
        method = get_method(name)
        where = f"{name} " if several else ""
        for key, value in self.params_for(name).items():
            param = method.param(key)
            if isinstance(value, ParamRange):
                if param.boolean:
                    raise MergesearchError(f"params.{key} is true/false: fix it, do not "
                                           "search it")
                param.check(value.low, f"{where}params.{key}")
                param.check(value.high, f"{where}params.{key}")
            else:
                param.check(value, f"{where}params.{key}")
        if method.base == "required" and self.base is None:
            raise MergesearchError(f"method {name!r} needs merge.base (a parent's name)")
        if method.base == "ignored" and self.base is not None and not several:
            raise MergesearchError(f"method {name!r} takes no base model; remove merge.base")
        searched = [p.name for p in method.params if p.name in ("weight", "t")
                    or isinstance(self.params_for(name).get(p.name), ParamRange)]
        if not searched and not several:  # among several methods, it is one candidate
            numeric = [p.name for p in method.params if not p.boolean]
            raise MergesearchError(
                f"method {name!r} leaves nothing to search: "
                + (f"give a [low, high] range in merge.params for {', '.join(numeric)}"
                   if numeric else "it has no numeric parameter; merge it once with "
                   "`mergesearch merge` instead"))


class ObjectiveSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    probes: list[str] = Field(min_length=1)
    metric: str | None = None
    direction: Literal["maximize", "minimize"] = "maximize"
    weight: float = Field(1.0, gt=0, description="its share with combine: weighted")


class ConstraintSpec(_Strict):
    """`objective` at least (or at most) a value, or a fraction of a parent's dev value."""

    objective: str
    at_least: float | None = None
    at_most: float | None = None
    of_parent: str | None = Field(None, description="the bound is this fraction of the "
                                  "parent's own dev value of the objective")

    @model_validator(mode="after")
    def _one_bound(self) -> ConstraintSpec:
        if (self.at_least is None) == (self.at_most is None):
            raise ValueError("give exactly one of at_least and at_most")
        return self


SAMPLERS_WITH_CONSTRAINTS = ("tpe", "gp", "nsga2")
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)


class SamplerSpec(_Strict):
    name: Literal["tpe", "gp", "cmaes", "nsga2", "random", "grid"] = "tpe"
    n_startup_trials: int = Field(10, ge=0)
    grid_points: int = Field(3, ge=2, description="values per dimension for grid")


class BudgetSpec(_Strict):
    n_trials: int | None = Field(30, gt=0)
    timeout: float | None = Field(None, gt=0, description="seconds")


VLLM_ONLY = ("max_model_len", "gpu_memory_utilization", "kv_cache_memory_bytes",
             "enforce_eager", "tensor_parallel_size", "seed", "enable_prefix_caching")
HF_ONLY = ("batch_size",)


class EngineSpec(_Strict):
    """The engine that scores candidates: `hf` (transformers, CPU or GPU), `vllm` (one warm
    vLLM engine per worker, on a GPU or on vLLM's CPU build, merged weights swapped in place)
    or `auto` (vllm where it is installed and runs, else hf). Settings that only one kind
    reads are refused under the other."""

    kind: Literal["auto", "hf", "vllm"] = "hf"
    device: str = Field("auto", description="hf: a torch device; vllm: auto, cuda (choose "
                        "GPUs with CUDA_VISIBLE_DEVICES) or cpu, as the installed vLLM build")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(32, gt=0, description="hf: prompts per forward pass")
    parents: Literal["auto", "device", "pinned", "memory", "mmap"] = Field(
        "auto", description="where parent weights stay resident between trials (auto: hf, "
        "on the device if they take under half its free memory, else pinned or host memory "
        "or mmap; vllm on a GPU, on the GPU if the memory plan fits them there, else pinned; "
        "vllm on the CPU, in memory if they fit, else mmap)")
    max_model_len: int | None = Field(None, gt=1, description="vllm: positions per sequence "
                                      "(default: the model's own)")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vllm: fraction of the GPU vLLM takes for model, "
        "activations and KV cache (default: what is left once parents on the GPU fit)")
    kv_cache_memory_bytes: int | None = Field(
        None, gt=0, description="vllm: KV cache size in bytes, instead of a fraction")
    enforce_eager: bool = Field(False, description="vllm: no CUDA graphs or torch.compile")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per engine")
    seed: int | None = Field(None, description="vllm: engine seed (default: the study's)")
    enable_prefix_caching: bool = Field(
        False, description="vllm: reuse KV of shared prompt prefixes (reset at each swap)")

    @model_validator(mode="after")
    def _settings_of_kind(self) -> EngineSpec:
        # A setting of the other kind is refused when it differs from its default (a spec
        # stored with a study holds every field, defaults included).
        foreign = {"hf": VLLM_ONLY, "vllm": HF_ONLY, "auto": ()}[self.kind]
        given = [name for name in foreign
                 if getattr(self, name) != type(self).model_fields[name].default]
        if given:
            other = "vllm" if self.kind == "hf" else "hf"
            raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} "
                             f"to engine kind {other} only, and this engine is {self.kind}")
        if self.gpu_memory_utilization is not None and self.kv_cache_memory_bytes is not None:
            raise ValueError("give gpu_memory_utilization or kv_cache_memory_bytes, not both")
        if self.kind == "vllm" and self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device {self.device!r}: a vllm engine runs where its build "
                             "does (the GPUs that CUDA_VISIBLE_DEVICES shows, or the CPU); use "
                             "auto, cuda or cpu")
        return self


class PruningSpec(_Strict):
    """Stop a hopeless trial between chunks, from its per-item scores: with one objective
    (or combine: weighted) Optuna's Wilcoxon pruner against the best trial's items; with
    several, once a Pareto-front member is significantly better on every objective."""

    enabled: bool = False
    p_threshold: float = Field(0.1, gt=0, lt=1)
    min_items: int = Field(16, ge=1, description="items scored before a trial may be pruned")
    margin: float = Field(0.02, ge=0, description="several objectives: a trial at most this "
                          "much better than a front member on an objective (in its metric's "
                          "units) counts as not better there")


class HeartbeatSpec(_Strict):
    """A running trial's worker beats every `interval` seconds; a trial whose worker has
    been silent for `grace` seconds (killed, its machine gone) is marked failed by the next
    worker to start a trial, and retried up to `retries` times."""

    interval: int = Field(30, gt=0)
    grace: int | None = Field(None, gt=0, description="default: 4 × interval")
    retries: int = Field(2, ge=0)


class EvaluationSpec(_Strict):
    chunk_size: int = Field(64, gt=0)
    test_top_k: int = Field(3, ge=0, description="best trials scored on test after the study")
    pruning: PruningSpec = PruningSpec()


class StudySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    parents: list[ModelRef] = Field(min_length=2)
    merge: MergeSpec = MergeSpec()
    probes: list[AnyProbeConfig] = Field(min_length=1)
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    combine: Literal["pareto", "weighted"] = Field(
        "pareto", description="several objectives: a Pareto study, or one weighted sum")
    constraints: list[ConstraintSpec] = Field(default_factory=list)
    sampler: SamplerSpec = SamplerSpec()
    budget: BudgetSpec = BudgetSpec()
    storage: str | None = None
    artifacts: Path | None = Field(
        None, description="folder of the file-system artifact store (items of each trial, "
        "for the dashboard); default: beside a SQLite database, else artifacts/ beside the spec")
    engine: EngineSpec = EngineSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    heartbeat: HeartbeatSpec = HeartbeatSpec()

    @model_validator(mode="after")
    def _cross_references(self) -> StudySpec:
        _unique("parents", [p.name for p in self.parents])
        _unique("probes", [p.name for p in self.probes])
        _unique("objectives", [o.name for o in self.objectives])
        parent_names = [p.name for p in self.parents]
        for key in ("source", "base"):
            name = getattr(self.merge, key)
            if name is not None and name not in parent_names:
                raise ValueError(f"merge.{key} {name!r} is not a parent "
                                 f"({', '.join(parent_names)})")
        try:
            for method in self.merge.methods:
                get_method(method).check_model_count(
                    len(parent_names) - (self.merge.base is not None))
        except MergesearchError as e:
            raise ValueError(str(e)) from None
        if len(self.merge.methods) > 1 and self.sampler.name == "grid":
            raise ValueError("sampler grid searches one method: list one in merge.method, "
                             "or use another sampler")
        objective_names = [o.name for o in self.objectives]
        for i, constraint in enumerate(self.constraints):
            if constraint.objective not in objective_names:
                raise ValueError(f"constraints[{i}].objective {constraint.objective!r} is not "
                                 f"an objective ({', '.join(objective_names)})")
            if constraint.of_parent is not None and constraint.of_parent not in parent_names:
                raise ValueError(f"constraints[{i}].of_parent {constraint.of_parent!r} is not "
                                 f"a parent ({', '.join(parent_names)})")
        if len(self.directions) > 1 and self.sampler.name in SINGLE_OBJECTIVE_SAMPLERS:
            raise ValueError(f"sampler {self.sampler.name!r} optimises one objective; use "
                             "combine: weighted, or another sampler (tpe, gp, nsga2, random)")
        probe_names = {p.name for p in self.probes}
        for i, objective in enumerate(self.objectives):
            for name in objective.probes:
                if name not in probe_names:
                    raise ValueError(f"objectives[{i}] names probe {name!r}, which is not "
                                     f"defined (probes: {', '.join(sorted(probe_names))})")
        return self

    @property
    def source_parent(self) -> ModelRef:
        """The parent whose config, tokenizer and chat template the merge uses: `merge.source`,
        else the last parent with a chat template (the instruct model), else the last."""
        if self.merge.source:
            return next(p for p in self.parents if p.name == self.merge.source)
        return ([p for p in self.parents if has_chat_template(p.path)] or self.parents)[-1]

    @property
    def directions(self) -> list[str]:
        """What the Optuna study optimises: each objective, or one weighted sum."""
        if self.combine == "weighted":
            return ["maximize"]
        return [o.direction for o in self.objectives]

    @property
    def metric_names(self) -> list[str]:
        if self.combine == "weighted":
            return ["weighted"]
        return [o.name for o in self.objectives]

    def coefficient(self, objective: ObjectiveSpec) -> float:
        """What an objective's value is multiplied by in the study's value: 1 for a Pareto
        study; its share of the weights, negative when minimised, for a weighted one."""
        if self.combine != "weighted":
            return 1.0
        sign = 1.0 if objective.direction == "maximize" else -1.0
        return sign * objective.weight / sum(o.weight for o in self.objectives)

    def study_values(self, objectives: dict[str, float]) -> list[float]:
        """Objective values as the study sees them: as they are, or their weighted sum."""
        if self.combine != "weighted":
            return [objectives[o.name] for o in self.objectives]
        return [sum(self.coefficient(o) * objectives[o.name] for o in self.objectives)]

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def has_chat_template(folder: Path) -> bool:
    """Whether a model folder's tokenizer carries a chat template (its own file, or a key of
    tokenizer_config.json as older transformers wrote it)."""
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        return "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False


def _unique(what: str, names: list[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what}: name {name!r} is used twice")
        seen.add(name)


# ---------------------------------------------------------------- loading with line numbers


def _line_map(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Line (1-based) of every key and item in a composed YAML document."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, key.value)
            lines.update(_line_map(value, child))
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, value in enumerate(node.value):
            lines.update(_line_map(value, (*path, index)))
    return lines


def _field_name(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _located(loc: tuple, lines: dict[tuple, int]) -> tuple[tuple, int | None]:
    """Drop pydantic's union-tag components (not in the YAML) and find the nearest line."""
    real = tuple(p for p in loc if p not in PROBE_KINDS)
    for end in range(len(real), -1, -1):
        if real[:end] in lines:
            return real, lines[real[:end]]
    return real, None


def _describe(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field; remove it or check its spelling"
    if error["type"] == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"unknown probe kind {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    message = error["msg"]
    return message.removeprefix("Value error, ")


def parse_spec(data: Any, where: str, lines: dict[tuple, int] | None = None,
               base_dir: Path | None = None) -> StudySpec:
    """Validate spec data; `where` is the file name used in messages."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: a study spec must be a YAML mapping of fields")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = tuple(first["loc"])
        if first["type"] == "union_tag_invalid":
            loc = (*loc, first.get("ctx", {}).get("discriminator", "").strip("'"))
        loc, line = _located(loc, lines or {})
        at = f"{where}:{line}" if line else where
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise SpecError(f"{at}: {_field_name(loc)}: {_describe(first)}{more}") from None
    if base_dir is not None:
        _resolve_paths(spec, base_dir, where, lines or {})
    return spec


def _resolve_paths(spec: StudySpec, base_dir: Path, where: str, lines: dict) -> None:
    for i, parent in enumerate(spec.parents):
        parent.path = (base_dir / parent.path.expanduser()).resolve()
        if not parent.path.is_dir():
            line = lines.get(("parents", i, "path"))
            raise SpecError(f"{where}:{line}: parents[{i}].path: folder {parent.path} does "
                            "not exist; give a Hugging Face model folder (absolute, or "
                            "relative to the spec)")
    spec.merge.warm_start = [(base_dir / p.expanduser()).resolve()
                             for p in spec.merge.warm_start]
    for probe in spec.probes:
        probe.resolve_paths(base_dir)
    if spec.artifacts is not None:
        spec.artifacts = (base_dir / spec.artifacts.expanduser()).resolve()
    if spec.storage is None:
        spec.storage = f"sqlite:///{(base_dir / 'study.db').resolve()}"
    elif spec.storage.startswith("sqlite:///") and not spec.storage.startswith("sqlite:////"):
        # A relative SQLite path means: next to the spec, wherever launch is run from.
        spec.storage = f"sqlite:///{(base_dir / spec.storage[len('sqlite:///'):]).resolve()}"


def load_spec(path: Path | str) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    lines = _line_map(node) if node is not None else {}
    return parse_spec(data, str(path), lines, path.parent)


def probe_where(spec: StudySpec, index: int) -> str:
    return f"probes[{index}] ({spec.probes[index].name})"
