"""Naming the device that merges and runs models: one check for every place a user names one."""

from __future__ import annotations

import torch

from mergesearch.errors import MergesearchError


def resolve_device(device: str, where: str = "device") -> str:
    """`auto` is the GPU when there is one, else the CPU; anything else must be a device
    torch knows and this machine has."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise MergesearchError(f"{where} {device!r} is not a device: use auto, cpu or cuda") \
            from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise MergesearchError(f"{where} {device!r}: this machine has no CUDA GPU")
    return device
