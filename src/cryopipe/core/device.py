"""Device selection: CUDA when present, CPU otherwise; the same code runs on both."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """The device that computations run on.

    ``$CRYOPIPE_DEVICE`` (e.g. ``cpu``, ``cuda``, ``cuda:1``) overrides; otherwise the first CUDA device
    when one is available, else the CPU.
    """
    name = os.environ.get("CRYOPIPE_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> :func:`default_device`; a string or device is passed through ``torch.device``."""
    if device is None:
        return default_device()
    return torch.device(device)
