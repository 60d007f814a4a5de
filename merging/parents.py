"""`Parents`: the input checkpoints, checked once to be mergeable, then held in memory.

Weights are read only from safetensors (never unpickled). Every parent must have the same
architecture, the same tensor names and the same shapes; the first difference is reported
with the tensor's name and both folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from mergesearch.errors import ParentError
from merging.layout import ModelLayout


def read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise ParentError(f"parent folder {folder} does not exist")
    if not config_path.is_file():
        raise ParentError(f"{folder} has no config.json: is it a Hugging Face model folder?")
    return json.loads(config_path.read_text())


def num_hidden_layers(config: dict) -> int:
    for source in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in source:
                return int(source[key])
    raise ParentError("config.json gives no layer count (num_hidden_layers)")


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: the shards its index names, or model.safetensors, or
    (for folders laid out otherwise) every *.safetensors file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ParentError(
            f"{folder} has no *.safetensors files; mergesearch loads weights only from "
            "safetensors (convert the checkpoint with transformers' save_pretrained)"
        )
    return files


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


class Parents:
    """Named parent checkpoints, verified to share architecture, tensor names and shapes."""

    def __init__(self, folders: dict[str, Path]):
        if not folders:
            raise ParentError("no parent models given")
        self.folders = {name: Path(folder) for name, folder in folders.items()}
        self.configs = {name: read_config(folder) for name, folder in self.folders.items()}
        self._check_architectures()
        self.tensors = {name: load_tensors(folder) for name, folder in self.folders.items()}
        self._check_tensors()
        first = next(iter(self.folders))
        self.names = sorted(self.tensors[first])
        self.layout = ModelLayout.from_names(self.names, num_hidden_layers(self.configs[first]))

    def _check_architectures(self) -> None:
        (ref_name, ref), *others = self.configs.items()
        for name, config in others:
            for key in ("model_type", "architectures"):
                if config.get(key) != ref.get(key):
                    raise ParentError(
                        f"parents {ref_name!r} ({self.folders[ref_name]}) and {name!r} "
                        f"({self.folders[name]}) differ in {key}: {ref.get(key)!r} vs "
                        f"{config.get(key)!r}; only fine-tunes of one base model can be merged"
                    )

    def _check_tensors(self) -> None:
        (ref_name, ref), *others = self.tensors.items()
        for name, tensors in others:
            missing = sorted(set(ref) ^ set(tensors))
            if missing:
                where = ref_name if missing[0] in ref else name
                raise ParentError(
                    f"tensor {missing[0]!r} is in parent {where!r} ({self.folders[where]}) "
                    f"but not in the other; parents {ref_name!r} and {name!r} must have the "
                    "same tensors"
                )
            for tensor_name in sorted(ref):
                a, b = ref[tensor_name].shape, tensors[tensor_name].shape
                if a != b:
                    raise ParentError(
                        f"tensor {tensor_name!r} has shape {tuple(a)} in parent {ref_name!r} "
                        f"({self.folders[ref_name]}) but {tuple(b)} in {name!r} "
                        f"({self.folders[name]}); parents must share every shape"
                    )

    def tensor(self, parent: str, name: str) -> torch.Tensor:
        return self.tensors[parent][name]
