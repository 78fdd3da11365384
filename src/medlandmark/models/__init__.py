"""Networks: routing attention, U-Net, HYATT-Net, H3DE-Net, and the registry build_model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medlandmark.errors import MedlandmarkError
from medlandmark.models.registry import available_models, build_model, register_model
from medlandmark.records.plan import Configuration, Plan
from medlandmark.records.run import RUN_FILE, WEIGHT_FILES, RunRecord
from medlandmark.records.weights import load_weights

__all__ = [
    "available_models",
    "build_model",
    "channels_last",
    "count_parameters",
    "forward_flops",
    "load_run_network",
    "network_for",
    "register_model",
]


def network_for(
    arch: str, configuration: Configuration, num_landmarks: int, in_channels: int = 1
) -> nn.Module:
    """The network ``arch`` as a plan configuration sizes it (its ``architectures[arch]``); a
    ValueError when the configuration plans no such network."""
    if arch not in configuration.architectures:
        planned = ", ".join(configuration.architectures) or "none"
        raise ValueError(
            f"configuration '{configuration.name}' plans no '{arch}' network (it plans {planned})"
        )
    sizes = configuration.architectures[arch]
    return build_model(
        arch, num_landmarks, in_channels, spatial_dims=configuration.spatial_dims, **sizes
    )


def channels_last(x: torch.Tensor | nn.Module, spatial_dims: int) -> torch.Tensor | nn.Module:
    """``x`` in the channels-last memory layout (values and shape unchanged): oneDNN's and
    cuDNN's fast convolution path; a 2-4x faster 3D training step on CPU."""
    memory_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    return (
        x.to(memory_format=memory_format)
        if isinstance(x, nn.Module)
        else x.contiguous(memory_format=memory_format)
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Floating-point operations of one forward pass (a multiply-add counts 2), counted on the
    meta device: no memory is allocated and nothing is computed."""
    model = model.to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(input_shape, device="meta"))
    return int(counter.get_total_flops())


def describe_models(plan: Plan, configuration: str) -> list[dict]:
    """Parameters and forward FLOPs (batch 1, the configuration's patch) of every architecture
    that fits the plan's dimensionality."""
    try:
        config = plan.configuration(configuration)
    except KeyError as error:
        raise MedlandmarkError(error.args[0]) from None
    channels = len(plan.modalities)
    shape = (1, channels, *config.patch_size)
    rows = []
    for arch, dims in sorted(available_models().items()):
        if config.spatial_dims not in dims or arch not in config.architectures:
            continue
        model = network_for(arch, config, len(plan.landmarks), channels)
        rows.append(
            {
                "architecture": arch,
                "configuration": configuration,
                "patch_size": config.patch_size,
                "width": _width(config.architectures[arch]),
                "parameters": count_parameters(model),
                "forward_flops": forward_flops(model, shape),
            }
        )
    return rows


def _width(sizes: dict) -> str:
    """A network's width as the plan gives it: a multiplier of the paper's, or base features."""
    if "width_multiplier" in sizes:
        return f"x{sizes['width_multiplier']:g}"
    return str(sizes["features_per_stage"][0])


def print_model_table(rows: list[dict]) -> None:
    """A table of architectures with their parameter counts and FLOPs."""
    from rich.table import Table

    from medlandmark.console import console

    table = Table(
        title="Networks sized by the plan",
        caption="width: xW of the paper's network, or the U-Net's first-stage features",
    )
    for column in (
        "architecture",
        "configuration",
        "patch",
        "width",
        "parameters",
        "forward GFLOP",
    ):
        table.add_column(
            column, justify="right" if column in ("parameters", "forward GFLOP") else "left"
        )
    for row in rows:
        table.add_row(
            row["architecture"],
            row["configuration"],
            "x".join(map(str, row["patch_size"])),
            row["width"],
            f"{row['parameters'] / 1e6:.2f} M",
            f"{row['forward_flops'] / 1e9:.1f}",
        )
    console.print(table)


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
