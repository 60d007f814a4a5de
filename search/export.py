"""Export a trial's merge as a Hugging Face folder, proving it is the weights that were scored.

The folder gets the merged weights (safetensors), the source parent's config, tokenizer,
chat template and generation config, the recipe with its provenance, and a short model card.
It is written under a temporary name beside OUT_DIR and renamed at the end, so an
interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import optuna
import torch
from safetensors.torch import save_file

from mergesearch import __version__
from mergesearch.errors import MergesearchError, StorageError
from merging import Materializer, Parents
from merging.materializer import WeightsHash
from search.report import select_trial
from search.study import recipe_of, stored_spec, test_results

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SKIP = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md"}


def _copy_model_files(source: Path, dest: Path) -> None:
    """Everything of the source parent but its weights: config, tokenizer, chat template."""
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in _SKIP:
            shutil.copy2(path, dest / path.name)


def export_trial(study: optuna.Study, which: str | int, out_dir: Path, force: bool = False) -> dict:
    """Write trial `which` (a number or `best`) to `out_dir`; return its provenance record."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise MergesearchError(f"{out_dir} already exists; choose another folder or pass --force")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergesearchError(f"{out_dir} is a file, not a folder; choose another OUT_DIR")
    spec = stored_spec(study)
    trial = select_trial(study, which)
    recipe = recipe_of(trial)
    recorded = trial.user_attrs.get("weights_sha256")
    dtype = getattr(torch, trial.user_attrs.get("weights_dtype", "float32"))

    materializer = Materializer(Parents({p.name: p.path for p in spec.parents}))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        digest = WeightsHash()
        tensors = dict(materializer.tensors(recipe, dtype, digest))
        if digest.hexdigest() != recorded:
            raise StorageError(
                f"merged weights of trial {trial.number} hash to {digest.hexdigest()[:16]}…, "
                f"not the {str(recorded)[:16]}… recorded when it was scored; the parents "
                "on disk are not the ones the study used"
            )
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        _copy_model_files(spec.source_parent.path, staging)
        _set_config_dtype(staging / "config.json", dtype)
        record = {
            "study": study.study_name,
            "trial": trial.number,
            "recipe": recipe.to_dict(),
            "weights_sha256": recorded,
            "weights_dtype": str(dtype).removeprefix("torch."),
            "parents": {p.name: str(p.path) for p in spec.parents},
            "source_parent": spec.source_parent.name,
            "dev": dict(zip([o.name for o in spec.objectives], trial.values, strict=True)),
            "test": test_results(study).get(trial.number, {}).get("objectives"),
            "mergesearch_version": __version__,
        }
        (staging / "mergesearch_recipe.json").write_text(json.dumps(record, indent=2) + "\n")
        (staging / "README.md").write_text(_model_card(record))
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
    return record


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    path.write_text(json.dumps(config, indent=2) + "\n")


def _model_card(record: dict) -> str:
    test = record["test"] or {}
    scores = "\n".join(
        f"| {name} | {value:.4f} | {format(test[name], '.4f') if name in test else ''} |"
        for name, value in record["dev"].items()
    )
    return f"""# Merged model: study `{record['study']}`, trial {record['trial']}

Made by mergesearch {record['mergesearch_version']} with `{record['recipe']['method']}` merging
of {', '.join(f'`{n}`' for n in record['parents'])}; config and tokenizer from
`{record['source_parent']}`.

| objective | dev | test |
|---|---|---|
{scores}

Weights sha256 ({record['weights_dtype']}): `{record['weights_sha256']}`

The full recipe and parent paths are in `mergesearch_recipe.json`.
"""
