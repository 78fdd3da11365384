"""Build a network from its architecture name and plain keyword arguments (timm-style registry).

Every network module registers a builder ``f(num_landmarks, in_channels, **sizes)``; the plan's
``architectures`` entry of a configuration holds those sizes (see
:func:`medlandmark.models.network_for`). Networks map ``(B, C, *patch)`` to a list of heatmaps:
``[0]`` at full resolution ``(B, K, *patch)``, the rest deep-supervision outputs at the strides
in ``model.output_strides``; ``model.output_weights`` are the loss weights of the outputs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_SPATIAL_DIMS: dict[str, tuple[int, ...]] = {}


def register_model(name: str, spatial_dims: tuple[int, ...] = (2, 3)):
    """Decorator registering ``builder(num_landmarks, in_channels, **sizes) -> nn.Module``."""

    def decorate(builder: Callable[..., nn.Module]):
        _BUILDERS[name] = builder
        _SPATIAL_DIMS[name] = spatial_dims
        return builder

    return decorate


def available_models() -> dict[str, tuple[int, ...]]:
    """Registered architecture names and the dimensionalities each supports."""
    _import_models()
    return dict(_SPATIAL_DIMS)


def build_model(
    arch: str, num_landmarks: int, in_channels: int = 1, *, spatial_dims: int, **sizes: object
) -> nn.Module:
    """The ``spatial_dims``-D network ``arch`` with ``num_landmarks`` heatmaps, sized by ``sizes``
    (the builder's keyword arguments; a plan configuration's ``architectures[arch]``)."""
    _import_models()
    if arch not in _BUILDERS:
        raise ValueError(
            f"unknown architecture '{arch}' (available: {', '.join(sorted(_BUILDERS))})"
        )
    if spatial_dims not in _SPATIAL_DIMS[arch]:
        raise ValueError(
            f"architecture '{arch}' is {_SPATIAL_DIMS[arch]}D only, the plan is {spatial_dims}D"
        )
    return _BUILDERS[arch](num_landmarks, in_channels, **sizes)


def _import_models() -> None:
    """Import the modules that register architectures (kept lazy so importing is cheap)."""
    import importlib

    for module in ("unet", "hyatt_net", "h3de_net"):
        importlib.import_module(f"medlandmark.models.{module}")
