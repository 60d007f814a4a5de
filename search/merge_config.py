"""`mergesearch merge CONFIG OUT_DIR`: run a mergekit YAML config with mergesearch's merger."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from mergesearch import __version__
from merging import Materializer, Parents
from merging.mergekit_config import read_mergekit_config
from search.export import write_model_folder


def merge_config(config_path: Path, out_dir: Path, force: bool = False,
                 placement: str = "memory") -> dict:
    """Merge as the config says and write a Hugging Face folder; return what was done."""
    loaded: dict[str, Parents] = {}

    def layout_of(paths: dict[str, Path]):
        loaded["parents"] = Parents(paths, placement)
        return loaded["parents"].layout

    config = read_mergekit_config(Path(config_path), layout_of)
    parents, recipe = loaded["parents"], config.recipe
    materializer = Materializer(parents)
    materializer.plan(recipe)  # every parameter checked before OUT_DIR is touched
    source_name = recipe.vocab_source or recipe.base or recipe.models[0]
    source = config.paths[source_name]
    dtype = config.dtype or getattr(torch, str(parents.configs[source_name].get(
        "torch_dtype") or parents.configs[source_name].get("dtype") or "float32"))
    record = {"recipe": recipe.to_dict(), "parents": {n: str(p) for n, p in config.paths.items()},
              "source_parent": source_name, "weights_dtype": str(dtype).removeprefix("torch."),
              "mergekit_config": str(Path(config_path).resolve()),
              "mergesearch_version": __version__}
    files = {"mergesearch_recipe.json": json.dumps(record, indent=2) + "\n",
             "mergekit_config.yml": yaml.safe_dump(
                 yaml.safe_load(Path(config_path).read_text()), sort_keys=False)}
    write_model_folder(out_dir, materializer.tensors(recipe, dtype), source, dtype, files, force,
                       inputs=config.paths.values())
    return record
