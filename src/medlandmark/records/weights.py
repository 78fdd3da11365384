"""Checkpoints and weights that load without executing code, written atomically.

A training checkpoint (everything needed to continue) is a ``torch.save`` file holding only
tensors, numbers, strings and containers of them, read back with ``weights_only=True``: a file
carrying any other pickled object is refused. Model weights for prediction are safetensors.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medlandmark.errors import MedlandmarkError
from medlandmark.io.files import atomic_path

CHECKPOINT_VERSION = 1


class CheckpointError(MedlandmarkError):
    """A checkpoint or weights file that cannot be (safely) loaded."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write a training checkpoint atomically: the previous file stays intact until the new one
    is complete (also when the disk fills up)."""
    with _write_error_explained(path, "checkpoint"), atomic_path(path) as tmp:
        torch.save({"checkpoint_version": CHECKPOINT_VERSION, **state}, tmp)


@contextlib.contextmanager
def _write_error_explained(path: str | Path, what: str):
    """A failed write (disk full, no permission) as a CheckpointError saying the old file is kept.

    A full disk is an OSError, a RuntimeError from torch.save ("unexpected pos") or a
    SafetensorError; the disk's free space is quoted to tell which."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        path = Path(path)
        kept = "the previous one is intact" if path.is_file() else "none was written"
        reason = (getattr(error, "strerror", None) or str(error)).strip().splitlines()[0][:200]
        free_mb = shutil.disk_usage(path.parent).free / 2**20 if path.parent.is_dir() else math.nan
        raise CheckpointError(
            f"could not write the {what}: {reason} ({free_mb:.0f} MB free on its disk); {kept}",
            path,
        ) from error


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a training checkpoint without executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint does not exist", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0]
        raise CheckpointError(
            f"refused to load: the file holds objects other than tensors and plain data, and "
            f"loading it could run code ({reason[:200]})",
            path,
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"not a readable checkpoint, truncated or corrupt ({str(error)[:200]})", path
        ) from None
    if not isinstance(state, dict) or state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"not a medlandmark checkpoint of version {CHECKPOINT_VERSION}", path)
    return state


def save_weights(path: str | Path, model: nn.Module) -> None:
    """Model weights as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    with _write_error_explained(path, "weights"), atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_weights(path: str | Path, model: nn.Module) -> nn.Module:
    """Load safetensors weights into ``model`` (names and shapes must match exactly)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("weights file does not exist", path)
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError or OSError
        raise CheckpointError(
            f"not a readable safetensors file ({str(error)[:200]})", path
        ) from None
    try:
        unwrap(model).load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"weights do not fit the network ({str(error).splitlines()[0]})", path
        ) from None
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel or compiled wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
