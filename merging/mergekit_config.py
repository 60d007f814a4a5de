"""mergekit YAML configs in and out.

In: a mergekit config (`models`, `base_model`, `merge_method`, `parameters` as scalars,
gradient lists or filtered conditions, `dtype`, `out_dtype`, `tokenizer_source`) becomes a
`MergeRecipe` whose values, resolved tensor by tensor, are the ones mergekit resolves:
  - a gradient list is interpolated at t = i / (L - 1) for layer i of L, and at t = 0 for
    tensors outside the layers (mergekit plans embeddings, final norm and lm_head at t = 0);
  - a filter matches when it is a substring of the tensor name; the first match wins;
  - a model's own setting overrides the top-level one, which overrides the default.
Out: any recipe whose method and parameters mergekit has is written back as a config that
mergekit resolves to the same values (checked by reading it back), using one gradient list
per kind of layer tensor and filters for the rest.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mergesearch.errors import SpecError
from merging.layout import ModelLayout
from merging.methods import MergeMethod, get_method
from merging.recipe import MergeRecipe

SUPPORTED_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
                  "tokenizer_source"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Parameters only mergesearch has; a recipe that sets them away from default has no mergekit
# equivalent.
OWN_PARAMS = {"rescale_by_probability"}


@dataclass(frozen=True)
class MergekitConfig:
    """A parsed config: the recipe, where each named model lives, and the output dtype."""

    recipe: MergeRecipe
    paths: dict[str, Path]
    dtype: torch.dtype | None


def _error(where: str, message: str) -> SpecError:
    return SpecError(f"{where}: {message}")


def _model_path(ref: Any, where: str, root: Path) -> Path:
    if not isinstance(ref, str) or not ref:
        raise _error(where, f"a model must be a folder path, not {ref!r}")
    if "+" in ref or "@" in ref:
        raise _error(where, f"{ref!r}: LoRA (+) and revision (@) references are not supported")
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_dir():
        raise _error(where, f"{ref!r} is not a model folder (mergesearch merges local "
                     "folders; download hub models first, e.g. with `hf download`)")
    return path


def _name_models(paths: list[Path]) -> dict[Path, str]:
    """Short unique names for model folders: the folder name, numbered on clashes."""
    names: dict[Path, str] = {}
    for path in paths:
        if path in names:
            continue
        name, n = path.name or "model", 1
        while name in names.values():
            n += 1
            name = f"{path.name}_{n}"
        names[path] = name
    return names


def _scalar(value: Any, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise _error(where, f"expected a number or true/false, not {value!r}")


def evaluate_setting(setting: Any, tensor: str, t: float, where: str) -> float | None:
    """mergekit's resolution of one parameter setting for one tensor at gradient position t."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return _scalar(setting, where)
    if not setting:
        return None
    if all(not isinstance(e, dict | list) for e in setting):
        values = [_scalar(e, f"{where}[{i}]") for i, e in enumerate(setting)]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for i, cond in enumerate(setting):
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"value", "filter"}:
            raise _error(f"{where}[{i}]", "a condition is {filter: NAME, value: VALUE}")
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor and str(flt) in tensor):
            return evaluate_setting(cond["value"], tensor, t, f"{where}[{i}].value")
    return None


def _gradient_position(gene: str, num_layers: int) -> float:
    if not gene.startswith("layers."):
        return 0.0
    index = int(gene.split(".")[1])
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def _check_gradients(setting: Any, num_layers: int, where: str) -> None:
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return
    if all(not isinstance(e, dict | list) for e in setting):
        if len(setting) > num_layers:
            raise _error(where, f"gradient has {len(setting)} values but the model has only "
                         f"{num_layers} layers")
        return
    for i, cond in enumerate(setting):
        if isinstance(cond, dict) and "value" in cond:
            _check_gradients(cond["value"], num_layers, f"{where}[{i}].value")


def _compact(values: dict[str, float], layout: ModelLayout) -> float | dict[str, float]:
    """Per-tensor values as a scalar, or keyed by gene where a gene's tensors agree, else by
    tensor name."""
    if len(set(values.values())) == 1 and len(values) == len(layout.genes_by_tensor):
        return next(iter(values.values()))
    by_gene: dict[str, dict[str, float]] = {}
    for tensor, value in values.items():
        by_gene.setdefault(layout.gene(tensor), {})[tensor] = value
    out: dict[str, float] = {}
    for gene, tensors in by_gene.items():
        every = [t for t, g in layout.genes_by_tensor.items() if g == gene]
        if len(set(tensors.values())) == 1 and len(tensors) == len(every):
            out[gene] = next(iter(tensors.values()))
        else:
            out.update(tensors)
    return out


def _resolve(method: MergeMethod, settings: dict, layout: ModelLayout, scope: str,
             per_model: bool) -> dict[str, float | dict[str, float]]:
    """Every parameter a settings block gives, resolved for each tensor."""
    out = {}
    for name, setting in settings.items():
        where = f"{scope}.{name}"
        try:
            param = method.param(name)
        except Exception as e:
            raise _error(where, str(e)) from None
        if per_model and not param.per_model:
            continue  # mergekit reads shared parameters only from the top level
        _check_gradients(setting, layout.num_layers, where)
        values = {}
        for tensor, gene in layout.genes_by_tensor.items():
            value = evaluate_setting(setting, tensor, _gradient_position(gene, layout.num_layers),
                                     where)
            if value is not None:
                param.check(value, where)
                values[tensor] = value
        if values:
            out[name] = _compact(values, layout)
    return out


def read_mergekit_config(path: Path, layout_of: Any) -> MergekitConfig:
    """Parse a mergekit YAML file. `layout_of(paths)` returns the parents' `ModelLayout`
    (the caller loads the parents once and shares them)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read the config: {e}") from None
    return parse_mergekit_config(data, str(path), Path(path).resolve().parent, layout_of)


def parse_mergekit_config(data: Any, where: str, root: Path, layout_of: Any) -> MergekitConfig:
    """Parse a loaded config; relative model paths are relative to `root`."""
    if not isinstance(data, dict):
        raise _error(where, "a mergekit config is a mapping with models and merge_method")
    unsupported = sorted(set(data) - SUPPORTED_KEYS)
    if unsupported:
        raise _error(f"{where}: {unsupported[0]}", "this mergekit key is not supported "
                     f"(supported: {', '.join(sorted(SUPPORTED_KEYS))})")
    for key in ("models", "merge_method"):
        if key not in data:
            raise _error(f"{where}: {key}", "missing")
    try:
        method = get_method(str(data["merge_method"]))
    except Exception as e:
        raise _error(f"{where}: merge_method", str(e)) from None
    entries = data["models"]
    if not isinstance(entries, list) or not entries:
        raise _error(f"{where}: models", "must be a non-empty list of {model: PATH}")
    model_paths, model_settings = [], []
    for i, entry in enumerate(entries):
        here = f"{where}: models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model",
                                                                               "parameters"}:
            raise _error(here, "each model is {model: PATH, parameters: {...}}")
        model_paths.append(_model_path(entry["model"], f"{here}.model", root))
        model_settings.append(entry.get("parameters") or {})
    base_path = (_model_path(data["base_model"], f"{where}: base_model", root)
                 if data.get("base_model") else None)
    source = data.get("tokenizer_source")
    source_path = None
    if source not in (None, "base"):
        if source == "union":
            raise _error(f"{where}: tokenizer_source", "'union' is not supported; use base "
                         "or a model")
        source_path = _model_path(source, f"{where}: tokenizer_source", root)
    elif source == "base" and base_path is None:
        raise _error(f"{where}: tokenizer_source", "'base' needs a base_model")

    everyone = model_paths + ([base_path] if base_path else []) + (
        [source_path] if source_path else [])
    names = _name_models(everyone)
    paths = {names[p]: p for p in everyone}
    layout = layout_of(paths)

    settings_of = dict(zip((names[p] for p in model_paths), model_settings, strict=True))
    if method.base == "ignored":
        models = [names[p] for p in model_paths]
        if base_path is not None and names[base_path] not in models:
            models.append(names[base_path])  # mergekit adds the base as one more input
        base = None
    else:
        base = names[base_path] if base_path else None
        models = [names[p] for p in model_paths if names[p] != base]
    model_params = {}
    for model in models:
        block = settings_of.get(model, {})
        if not isinstance(block, dict):
            raise _error(f"{where}: models[{model}].parameters", "must be a mapping")
        model_params[model] = _resolve(method, block, layout, f"{where}: models[{model}]"
                                       ".parameters", per_model=True)
    top = data.get("parameters") or {}
    if not isinstance(top, dict):
        raise _error(f"{where}: parameters", "must be a mapping")
    params = _resolve(method, top, layout, f"{where}: parameters", per_model=False)
    dtype_name = data.get("out_dtype") or data.get("dtype")
    if dtype_name is not None and dtype_name not in DTYPES:
        raise _error(f"{where}: dtype", f"{dtype_name!r} is not one of {', '.join(DTYPES)}")
    vocab_source = (names[base_path] if source == "base"
                    else names[source_path] if source_path else None)
    recipe = MergeRecipe(method=method.name, models=tuple(models), base=base,
                         model_params={m: p for m, p in model_params.items() if p},
                         params=params, vocab_source=vocab_source)
    return MergekitConfig(recipe, paths, DTYPES[dtype_name] if dtype_name else None)


def _tensor_values(recipe: MergeRecipe, layout: ModelLayout, name: str,
                   model: str | None) -> dict[str, float | None]:
    return {t: recipe.value(name, g, t, model) for t, g in layout.genes_by_tensor.items()}


def _setting(values: dict[str, float | None], layout: ModelLayout) -> Any:
    """A mergekit setting that resolves to `values` (tensor -> value) for every tensor."""
    if None in values.values():
        return None
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    # One gradient list per kind of layer tensor (its name after the layer index).
    lists: dict[str, list[float | None]] = {}
    outer: dict[str, float] = {}
    for tensor, gene in layout.genes_by_tensor.items():
        if gene.startswith("layers."):
            parts = tensor.split(".")
            index = int(gene.split(".")[1])
            at = parts.index(str(index))
            suffix = "." + ".".join(parts[at + 1 :])
            lists.setdefault(suffix, [None] * layout.num_layers)[index] = values[tensor]
        else:
            outer[tensor] = values[tensor]
    if any(None in v for v in lists.values()):
        return None  # a kind of tensor some layers lack: no gradient list fits it
    def flat(v: list[float]) -> Any:
        return v[0] if len(set(v)) == 1 else v
    fallback = Counter(tuple(v) for v in lists.values()).most_common(1)[0][0] if lists else ()
    conditions = [{"filter": tensor, "value": value} for tensor, value in outer.items()
                  if not fallback or value != fallback[0]]
    conditions += [{"filter": suffix, "value": flat(v)} for suffix, v in lists.items()
                   if tuple(v) != fallback]
    if fallback:
        conditions.append({"value": flat(list(fallback))})
    return conditions


def to_mergekit_config(recipe: MergeRecipe, paths: dict[str, Path], layout: ModelLayout,
                       dtype: torch.dtype, vocab_differs: bool = False) -> dict | None:
    """The mergekit config equivalent to `recipe`, or None when mergekit cannot express it.
    It computes in float32 as mergesearch does; `tokenizer_source` is written only when the
    parents' vocabularies differ (otherwise mergekit would rebuild identical embeddings)."""
    method = get_method(recipe.method)
    for p in method.params:
        if p.name in OWN_PARAMS and any(
                v not in (None, p.default) for v in _tensor_values(recipe, layout, p.name, None)
                .values()):
            return None
    config: dict[str, Any] = {"merge_method": recipe.method}
    models = []
    for model in recipe.models:
        block = {}
        for p in method.model_params:
            if p.name in recipe.model_params.get(model, {}):
                block[p.name] = _setting(_tensor_values(recipe, layout, p.name, model), layout)
        models.append({"model": str(paths[model])} | ({"parameters": block} if block else {}))
    config["models"] = models
    if recipe.base:
        config["base_model"] = str(paths[recipe.base])
    top = {name: _setting(_tensor_values(recipe, layout, name, None), layout)
           for name in recipe.params if name not in OWN_PARAMS}
    if top:
        config["parameters"] = top
    config["dtype"] = "float32"
    config["out_dtype"] = str(dtype).removeprefix("torch.")
    if recipe.vocab_source and vocab_differs:
        config["tokenizer_source"] = ("base" if recipe.vocab_source == recipe.base
                                      else str(paths[recipe.vocab_source]))
    if any(v is None for v in top.values()) or any(
            v is None for m in models for v in m.get("parameters", {}).values()):
        return None
    try:
        parsed = parse_mergekit_config(config, "exported config", Path("/"), lambda _: layout)
    except SpecError:  # a setting mergekit's grammar cannot hold
        return None
    name_of = {Path(path): name for name, path in paths.items()}
    rename = {name: name_of[path] for name, path in parsed.paths.items()}
    back = parsed.recipe
    back = MergeRecipe(
        method=back.method, models=tuple(rename[m] for m in back.models),
        base=rename[back.base] if back.base else None, params=back.params,
        model_params={rename[m]: v for m, v in back.model_params.items()})
    return config if _same_values(method, recipe, back, layout) else None


def _same_values(method: MergeMethod, a: MergeRecipe, b: MergeRecipe, layout: ModelLayout
                 ) -> bool:
    """Whether two recipes resolve every parameter of every tensor alike (within 1e-9)."""
    if (a.models, a.base) != (b.models, b.base):
        return False
    for p in method.params:
        if p.name in OWN_PARAMS:
            continue
        for model in (a.models if p.per_model else (None,)):
            va = _tensor_values(a, layout, p.name, model)
            vb = _tensor_values(b, layout, p.name, model)
            for tensor, x in va.items():
                y = vb[tensor]
                if (x is None) != (y is None):
                    return False
                if x is not None and abs(x - y) > 1e-9 * (1 + abs(x)):
                    return False
    return True
