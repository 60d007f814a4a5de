"""Export a trial's merge as a Hugging Face folder, proving it is the weights that were scored.

The folder gets the merged weights (safetensors), the source parent's config, tokenizer,
chat template and generation config, the recipe with its provenance, the equivalent
mergekit config where mergekit can express the recipe, and a short model card.
It is written under a temporary name beside OUT_DIR and renamed at the end, so an
interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import optuna
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig

from mergesearch.devices import resolve_device
from mergesearch.errors import MergesearchError
from merging import Materializer, Parents
from merging.materializer import WeightsHash
from merging.mergekit_config import to_mergekit_config
from search import model_card
from search.model_card import file_hashes, software_versions
from search.report import baseline_scores
from search.selection import Rule, select_trial
from search.study import dev_objectives, recipe_of, stored_spec, test_results, verify_weights
from storage.records import RecordStore

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# the source's own index and, where it is itself an export, its card and provenance
_SKIP = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md",
         "mergesearch_recipe.json", "mergekit_config.yml"}


def _copy_model_files(source: Path, dest: Path) -> None:
    """Everything of the source parent but its weights: config, tokenizer, chat template."""
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in _SKIP:
            shutil.copy2(path, dest / path.name)


MAX_SHARD_BYTES = 5 * 2**30


def _save_sharded(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Stream tensors into safetensors shards of bounded size (one shard in memory at a
    time): model.safetensors, or model-0000i-of-0000n.safetensors with an index."""
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        save_file(shard, str(folder / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
        shards.append(list(shard))

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor.to("cpu").contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        (folder / "shard-0.tmp").rename(folder / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"shard-{i}.tmp").rename(folder / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_model_folder(
    out_dir: Path,
    tensors: Iterator[tuple[str, torch.Tensor]],
    source: Path,
    dtype: torch.dtype,
    files: dict[str, str],
    force: bool = False,
    check: Callable[[], None] | None = None,
    inputs: Collection[Path] = (),
) -> None:
    """Write a Hugging Face folder: the tensors, the source model's config and tokenizer
    (config dtype set to `dtype`) and extra text `files`. It is built under a temporary name
    beside `out_dir` and renamed into place only when complete (after `check()` passes)."""
    out_dir = Path(out_dir)
    target = out_dir.resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if folder == target or target in folder.parents:
            raise MergesearchError(f"{out_dir} holds the input model {folder}; "
                                   "choose another OUT_DIR")
    if out_dir.exists() and not force:
        raise MergesearchError(f"{out_dir} already exists; choose another folder or pass --force")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergesearchError(f"{out_dir} is a file, not a folder; choose another OUT_DIR")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        _save_sharded(tensors, staging)
        if check is not None:
            check()
        _copy_model_files(source, staging)
        _set_config_dtype(staging / "config.json", dtype)
        if not (staging / "generation_config.json").exists():
            GenerationConfig.from_model_config(AutoConfig.from_pretrained(staging)
                                               ).save_pretrained(staging)
        for name, text in files.items():
            (staging / name).write_text(text)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp made it private
        if out_dir.exists():  # --force: swap, so an interruption never leaves nothing
            old = staging.with_name(staging.name.replace(".partial-", ".replaced-"))
            out_dir.rename(old)
            staging.rename(out_dir)
            shutil.rmtree(old)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _chosen_as(which: str | int | Rule, trial: int) -> str:
    if isinstance(which, Rule):
        optimise = (f", then the {'highest' if which.optimise[1] else 'lowest'} "
                    f"{which.optimise[0]}" if which.optimise else "")
        return f"the rule {which.describe() or 'all feasible trials'}{optimise} (dev scores)"
    if which == "best":
        return "the study's best trial (dev score)"
    if which == "knee":
        return "the knee of the feasible Pareto front (dev scores)"
    return f"trial {trial}, named by the user"


def export_trial(study: optuna.Study, which: str | int | Rule, out_dir: Path, force: bool = False,
                 device: str = "auto", records: RecordStore | None = None) -> dict:
    """Write trial `which` (a number, `best`, `knee` or a `Rule`) to `out_dir`; return its
    provenance record (also written as mergesearch_recipe.json and shown in README.md).

    The merge is rebuilt on `device`; `auto` is the kind of device the trial was merged on
    when this machine has one (only then can its bytes be proven the same), else the CPU.
    `records` gets a row for the export once the folder is complete."""
    spec = stored_spec(study)
    trial = select_trial(study, which)
    recipe = recipe_of(trial)
    dtype_name = trial.user_attrs.get("weights_dtype", "float32")
    dtype = getattr(torch, dtype_name)
    if device == "auto":
        scored_on = trial.user_attrs.get("weights_device", "cpu")
        device = scored_on if resolve_device("auto") == scored_on else "cpu"
    device = resolve_device(device, "--device")
    paths = {p.name: p.path for p in spec.parents}
    parents = Parents(paths)
    digest = WeightsHash()
    tests = test_results(study)
    baselines = {b["name"]: {k: b[k] for k in ("trial", "dev", "test")}
                 for b in baseline_scores(study, spec, tests)}
    record = {
        "study": study.study_name,
        "trial": trial.number,
        "chosen_as": _chosen_as(which, trial.number),
        "seed": spec.seed,
        "recipe": recipe.to_dict(),
        "weights_sha256": None,
        "weights_dtype": dtype_name,
        "weights_device": torch.device(device).type,
        "weights_verified": None,
        "parents": {name: {"path": str(path), "files": file_hashes(path)}
                    for name, path in paths.items()},
        "source_parent": spec.source_parent.name,
        "dev": dev_objectives(trial, spec),
        "test": tests.get(trial.number, {}).get("objectives"),
        "baselines": baselines,
        "versions": software_versions(),
    }
    files: dict[str, str] = {}
    mergekit = to_mergekit_config(recipe, paths, parents.layout, dtype,
                                  parents.vocab_sizes_differ)
    mergekit_yaml = None if mergekit is None else yaml.safe_dump(mergekit, sort_keys=False)
    if mergekit_yaml is not None:
        files["mergekit_config.yml"] = mergekit_yaml

    def check() -> None:  # runs once every tensor is written, before the folder is named
        record["weights_sha256"] = digest.hexdigest()
        rebuilt = {"weights_dtype": dtype_name, "weights_device": record["weights_device"],
                   "weights_hash_format": WeightsHash.FORMAT}
        unverified = verify_weights(trial, record["weights_sha256"], rebuilt)
        record["weights_verified"] = unverified or True
        files["mergesearch_recipe.json"] = json.dumps(record, indent=2) + "\n"
        files["README.md"] = model_card.render(record, mergekit_yaml)

    tensors = Materializer(parents).tensors(recipe, dtype, digest, device=device)
    write_model_folder(out_dir, tensors, spec.source_parent.path, dtype, files, force, check,
                       inputs=paths.values())
    if records is not None:
        verified = record["weights_verified"]
        records.record_export(study.study_name, trial.number, Path(out_dir).resolve(),
                              record["weights_sha256"], "yes" if verified is True else verified)
    return record


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    path.write_text(json.dumps(config, indent=2) + "\n")
