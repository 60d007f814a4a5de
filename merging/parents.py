"""`Parents`: the input checkpoints, checked once to be mergeable, then held resident.

Weights are read only from safetensors (never unpickled). Every parent must have the same
architecture, the same tensor names and the same shapes; the first difference is reported
with the tensor's name and both folders. The one allowed difference is the number of rows
of the embedding and lm_head (parents whose vocabularies differ in size).

Where the weights live is the user's choice (`placement`):
- `memory`: read into ordinary host memory (default);
- `mmap`:   memory-mapped from the safetensors files; pages are read on first touch and
            shared with the OS page cache, so parents larger than RAM still work;
- `pinned`: page-locked host memory, for fast copies to a GPU;
- a torch device (`cuda`, `cuda:1`): resident on that device.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from mergesearch.devices import resolve_device
from mergesearch.errors import MergesearchError, ParentError
from merging.layout import VOCAB_GENES, ModelLayout

Tensors = dict[str, torch.Tensor]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


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


def load_tensors(folder: Path) -> Tensors:
    """Tensors read into process memory (recent safetensors hands out views of a mapped file;
    cloning makes them resident whatever the version)."""
    tensors: Tensors = {}
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name).clone()
    return tensors


def _header(data: bytes | mmap.mmap) -> tuple[int, dict]:
    """(offset of the tensor data, {name: {dtype, shape, data_offsets}}) of a safetensors
    file whose first bytes are `data`."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    header.pop("__metadata__", None)
    return 8 + header_len, header


def tensor_shapes(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor's dtype and shape, read from the files' headers alone."""
    shapes = {}
    for path in safetensors_files(folder):
        with open(path, "rb") as f:
            length = f.read(8)
            _, header = _header(length + f.read(struct.unpack("<Q", length)[0]))
        shapes.update({name: (_SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
                       for name, info in header.items()})
    return shapes


def map_tensors(folder: Path) -> Tensors:
    """Tensors that view memory-mapped safetensors files (copy-on-write, never written)."""
    tensors: Tensors = {}
    for path in safetensors_files(folder):
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        data_start, header = _header(mapped)
        for name, info in header.items():
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            count = (end - start) // dtype.itemsize
            flat = torch.frombuffer(mapped, dtype=dtype, count=count,
                                    offset=data_start + start) if count else \
                torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(info["shape"])
    return tensors


def place(tensors: Tensors, placement: str) -> Tensors:
    if placement == "memory":
        return tensors
    if placement == "pinned":
        if not torch.cuda.is_available():
            raise ParentError("placement 'pinned' needs a CUDA GPU; use 'memory' or 'mmap'")
        return {name: t.pin_memory() for name, t in tensors.items()}
    try:
        device = resolve_device(placement, "placement")
    except MergesearchError:
        raise ParentError(
            f"unknown placement {placement!r}: use memory, mmap, pinned or a GPU this machine "
            "has, like cuda"
        ) from None
    return {name: t.to(device) for name, t in tensors.items()}


def auto_placement(folders: dict[str, Path], device: str) -> str:
    """Where parents go when the user does not say: on the GPU if they take under half of its
    free memory (else pinned host memory); on a CPU in RAM if they take under half of what
    is available, else memory-mapped."""
    size = sum(p.stat().st_size for f in folders.values() for p in safetensors_files(Path(f)))
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return device if size < free / 2 else "pinned"
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return "memory" if size < available / 2 else "mmap"


class Parents:
    """Named parent checkpoints, verified to share architecture, tensor names and shapes."""

    def __init__(self, folders: dict[str, Path], placement: str = "memory"):
        if not folders:
            raise ParentError("no parent models given")
        folders = {name: Path(folder) for name, folder in folders.items()}
        configs = {name: read_config(folder) for name, folder in folders.items()}
        self._setup(folders, configs)
        self._check_architectures()
        read = map_tensors if placement == "mmap" else load_tensors
        self._set_tensors({name: read(folder) for name, folder in folders.items()},
                          placement if placement != "mmap" else "memory")

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensors], config: dict) -> Parents:
        """Parents given as tensors already in place (for benchmarks and tests); every
        parent shares `config`."""
        parents = cls.__new__(cls)
        parents._setup({name: Path(f"<{name}>") for name in tensors},
                       {name: config for name in tensors})
        parents._set_tensors(tensors, "memory")
        return parents

    def _setup(self, folders: dict[str, Path], configs: dict[str, dict]) -> None:
        self.folders = folders
        self.configs = configs

    def _set_tensors(self, tensors: dict[str, Tensors], placement: str) -> None:
        self.tensors = {name: place(t, placement) for name, t in tensors.items()}
        first = next(iter(self.folders))
        self.names = sorted(self.tensors[first])
        self.layout = ModelLayout.from_names(self.names, num_hidden_layers(self.configs[first]))
        self._check_tensors()

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
                vocab_rows_differ = (self.layout.gene(tensor_name) in VOCAB_GENES
                                     and a[1:] == b[1:])
                if a != b and not vocab_rows_differ:
                    raise ParentError(
                        f"tensor {tensor_name!r} has shape {tuple(a)} in parent {ref_name!r} "
                        f"({self.folders[ref_name]}) but {tuple(b)} in {name!r} "
                        f"({self.folders[name]}); parents must share every shape"
                    )

    def tensor(self, parent: str, name: str) -> torch.Tensor:
        return self.tensors[parent][name]

    @property
    def vocab_sizes_differ(self) -> bool:
        return any(len({t[name].shape for t in self.tensors.values()}) > 1
                   for name in self.names)

    @property
    def device(self) -> torch.device:
        first = next(iter(self.tensors.values()))
        return next(iter(first.values())).device
