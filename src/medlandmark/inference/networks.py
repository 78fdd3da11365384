"""A run folder's network with its weights, ready for inference."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medlandmark.errors import MedlandmarkError
from medlandmark.models import network_for
from medlandmark.records.run import RUN_FILE, WEIGHT_FILES, RunRecord
from medlandmark.records.weights import load_weights


def load_run_network(
    folder: Path, record: RunRecord, weights: str = "best", device: str | torch.device = "cpu"
) -> nn.Module:
    """The run's network with its ``weights`` (best or final) on ``device``, in eval mode."""
    if weights not in WEIGHT_FILES:
        raise MedlandmarkError(f"weights must be one of {', '.join(WEIGHT_FILES)}, got '{weights}'")
    configuration = record.plan_configuration
    channels = len(record.plan.modalities)
    try:
        network = network_for(record.arch, configuration, len(record.landmarks), channels)
    except ValueError as error:
        raise MedlandmarkError(str(error), Path(folder) / RUN_FILE) from None
    load_weights(Path(folder) / WEIGHT_FILES[weights], network)
    return network.to(device).eval()
