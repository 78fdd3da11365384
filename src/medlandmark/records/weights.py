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
        raise CheckpointError(
            f"refused to load: the file holds objects other than tensors and plain data, and "
            f"loading it could run code{_unsupported_global(str(error))}; a medlandmark "
            "checkpoint never does: delete it and train again, or resume from a copy you trust",
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
    mismatch = weights_mismatch(unwrap(model).state_dict(), tensors)
    if mismatch:
        raise CheckpointError(
            f"weights do not fit the {type(unwrap(model)).__name__} that run.json describes "
            f"({mismatch}); were they trained with another plan or architecture?",
            path,
        )
    unwrap(model).load_state_dict(tensors, strict=True)
    return model


def weights_mismatch(expected: dict, found: dict) -> str:
    """What differs between a network's tensors and a file's (missing, unexpected, other
    shapes; an example of each), or "" when they fit."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [
        k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if reshaped:
        k = reshaped[0]
        shapes = [" x ".join(str(n) for n in t[k].shape) for t in (found, expected)]
        parts.append(
            f"{len(reshaped)} of other shapes, e.g. {k}: {shapes[0]} in the file, {shapes[1]} "
            "in the network"
        )
    return "; ".join(parts)


def _unsupported_global(text: str) -> str:
    """What torch's restricted unpickler stopped at ("Unsupported global: ...", "Unsupported
    operand ..."), without torch's advice to load the file anyway."""
    lines = [line.strip() for line in text.splitlines()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = [line.split("WeightsUnpickler error:", 1)[1].strip(), *lines[index + 1 :]]
            reason = next((r for r in rest if r), "")
            return f" (the loader stopped at: {reason[:160]})" if reason else ""
    return ""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel or compiled wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
