"""Start a run from another run's weights (``train --init-from RUN_OR_MODEL``).

The source is a run folder, a folder of runs (its run of the same configuration), or a shipped
model's name. It must be the same architecture at the same sizes. Landmarks are matched by name:
the output channels of the landmarks both runs have are copied, those only this run has start
from the fresh initialisation, and a layer that mixes landmark channels with other channels
(HYATT-Net's correction module) starts fresh unless the landmarks are the same in the same order.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from medlandmark.console import info
from medlandmark.errors import MedlandmarkError
from medlandmark.models import network_for
from medlandmark.records.model_card import run_or_model_folder
from medlandmark.records.plan import Configuration
from medlandmark.records.run import BEST_WEIGHTS, RUN_FILE, RunRecord, read_run_record
from medlandmark.records.weights import unwrap
from medlandmark.training.options import TrainingError

MIXED = -1  # a tensor whose landmark axis also holds other channels


def initial_run(source: str, configuration: str) -> Path:
    """The run folder whose best weights start this run: ``source`` itself, its run of
    ``configuration`` (a folder of runs; the first fold), or the same in a shipped model."""
    try:
        path = run_or_model_folder(source)
    except MedlandmarkError as error:
        raise TrainingError(f"--init-from {error.detail}") from None
    if (path / RUN_FILE).is_file():
        return path
    for folder in sorted(p.parent for p in path.glob(f"*/{RUN_FILE}")):
        if read_run_record(folder).configuration == configuration:
            return folder
    raise TrainingError(f"--init-from: no run of configuration '{configuration}' here", path)


def landmark_axes(arch: str, configuration: Configuration, channels: int) -> dict[str, int | None]:
    """For each of the network's tensors, the axis that holds one entry per landmark (None: no
    such axis; :data:`MIXED`: one that also holds other channels), found by building the network
    for one and for two landmarks on the meta device."""
    with torch.device("meta"):
        one = network_for(arch, configuration, 1, channels).state_dict()
        two = network_for(arch, configuration, 2, channels).state_dict()
    axes: dict[str, int | None] = {}
    for key, tensor in one.items():
        changed = [d for d in range(tensor.ndim) if tensor.shape[d] != two[key].shape[d]]
        if not changed:
            axes[key] = None
        elif len(changed) == 1 and tensor.shape[changed[0]] == 1:
            axes[key] = changed[0]
        else:
            axes[key] = MIXED
    return axes


def load_initial_weights(
    model: nn.Module,
    source: Path,
    arch: str,
    configuration: Configuration,
    landmarks: list[str],
    channels: int,
) -> None:
    """In place: ``model``'s weights from the best weights of the run ``source``, landmarks
    matched by name (module docstring); a TrainingError when the networks differ."""
    record = read_run_record(source)
    _check_compatible(record, source, arch, landmarks)
    found = load_file(str(source / BEST_WEIGHTS))
    state = unwrap(model).state_dict()
    axes = landmark_axes(arch, configuration, channels)
    same = record.landmarks == landmarks
    common = [name for name in landmarks if name in record.landmarks]
    to_index = torch.tensor([landmarks.index(n) for n in common])
    from_index = torch.tensor([record.landmarks.index(n) for n in common])
    fresh = []
    for key, target in state.items():
        weights = found.get(key)
        axis = axes.get(key)
        if weights is None or not _fits(weights.shape, target.shape, None if same else axis):
            raise TrainingError(
                f"--init-from: the weights of {source} do not fit this network ({key}); "
                "was it planned with other sizes?",
                source / BEST_WEIGHTS,
            )
        if same or axis is None:
            target.copy_(weights)
        elif axis == MIXED:
            fresh.append(key)
        else:
            target.index_copy_(axis, to_index, weights.index_select(axis, from_index).to(target))
    new = [n for n in landmarks if n not in record.landmarks]
    info(
        f"initialised from {source}: {len(common)} of {len(landmarks)} landmarks"
        + (f"; new: {', '.join(new)}" if new else "")
        + (f"; {len(fresh)} layers mixing landmark channels start fresh" if fresh else "")
    )


def _fits(found: torch.Size, wanted: torch.Size, axis: int | None) -> bool:
    """Whether a saved tensor fits the network's, all axes but a landmark ``axis`` alike."""
    if axis is None:
        return found == wanted
    if axis == MIXED:
        return True
    return len(found) == len(wanted) and all(
        a == b for d, (a, b) in enumerate(zip(found, wanted, strict=True)) if d != axis
    )


def _check_compatible(record: RunRecord, source: Path, arch: str, landmarks: list[str]) -> None:
    if record.arch != arch:
        raise TrainingError(
            f"--init-from: {source} is a {record.arch} run; this run trains {arch} "
            f"(use -a {record.arch})",
            source / RUN_FILE,
        )
    if not set(landmarks) & set(record.landmarks):
        raise TrainingError(
            f"--init-from: {source} has none of this dataset's landmarks "
            f"(it has {', '.join(record.landmarks[:5])}...)",
            source / RUN_FILE,
        )
