"""Build a network from its architecture name and a plan configuration (timm-style registry).

Every network module registers a constructor ``f(plan_config, num_landmarks, in_channels)``.
Networks map ``(B, C, *patch)`` to a list of heatmaps: ``[0]`` at full resolution
``(B, K, *patch)``, the rest deep-supervision outputs at the strides in ``model.output_strides``;
``model.output_weights`` are the loss weights of the outputs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_BUILDERS: dict[str, Callable[[dict, int, int], nn.Module]] = {}
_SPATIAL_DIMS: dict[str, tuple[int, ...]] = {}


def register_model(name: str, spatial_dims: tuple[int, ...] = (2, 3)):
    """Decorator registering ``builder(plan_config, num_landmarks, in_channels) -> nn.Module``."""

    def decorate(builder: Callable[[dict, int, int], nn.Module]):
        _BUILDERS[name] = builder
        _SPATIAL_DIMS[name] = spatial_dims
        return builder

    return decorate


def available_models() -> dict[str, tuple[int, ...]]:
    """Registered architecture names and the dimensionalities each supports."""
    _import_models()
    return dict(_SPATIAL_DIMS)


def build_model(
    arch: str, plan_config: dict, num_landmarks: int, in_channels: int = 1
) -> nn.Module:
    """The network ``arch`` sized by ``plan_config`` (a configuration of ``plans.json``)."""
    _import_models()
    if arch not in _BUILDERS:
        raise ValueError(
            f"unknown architecture '{arch}' (available: {', '.join(sorted(_BUILDERS))})"
        )
    spatial_dims = len(plan_config["patch_size"])
    if spatial_dims not in _SPATIAL_DIMS[arch]:
        raise ValueError(
            f"architecture '{arch}' is {_SPATIAL_DIMS[arch]}D only, the plan is {spatial_dims}D"
        )
    return _BUILDERS[arch](plan_config, num_landmarks, in_channels)


def _import_models() -> None:
    """Import the modules that register architectures (kept lazy so importing is cheap)."""
    import importlib

    for module in ("unet", "hyatt_net", "h3de_net"):
        importlib.import_module(f"medlandmark.models.{module}")
