"""Which torch device runs a job: ``auto`` (CUDA when present, else the CPU) or a named one."""

from __future__ import annotations

import os

import torch

from medlandmark.errors import MedlandmarkError


def select_device(name: str = "auto") -> torch.device:
    """The device ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``...); a MedlandmarkError when
    CUDA is asked for and there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedlandmarkError(f"--device {name} was asked for but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise MedlandmarkError(f"--device {name}: not a device ({error})") from None


def device_memory_gb(device: torch.device) -> float:
    """All the memory of ``device``: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
