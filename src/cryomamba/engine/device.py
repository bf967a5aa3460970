"""Turn the config's device string into a torch device; the device is always an explicit choice."""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """'auto' → the first CUDA device if there is one, else the CPU; 'cuda:N' must exist."""
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    device = torch.device(name)
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} was requested, but this machine has no GPU that PyTorch can use",
            hint="run on the CPU instead (device cpu, or auto to use a GPU only when there is "
            "one); to use a GPU, install a CUDA build of PyTorch and the NVIDIA driver",
        )
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s) found",
            hint=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
        )
    return torch.device("cuda", index)
