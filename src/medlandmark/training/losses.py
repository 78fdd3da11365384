"""Heatmap losses with missing landmarks masked out (or trained toward an empty map)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction - target).square()


def _smooth_l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(prediction, target, reduction="none", beta=0.1)


VOXEL_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": _mse,
    "smooth_l1": _smooth_l1,
}


HEATMAP_LOSSES = (*VOXEL_LOSSES, "balanced_mse")
FOREGROUND_LEVEL = 0.1  # target value above which a voxel counts as the landmark's neighbourhood


def _balanced_per_channel(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the foreground and the background of each channel
    separately, then summed: a Gaussian covering 0.5 % of a patch weighs as much as the rest,
    so the network cannot settle on an empty map."""
    error = (prediction - target).square().flatten(2)
    foreground = (target > FOREGROUND_LEVEL).flatten(2).float()
    background = 1.0 - foreground
    mean_fg = (error * foreground).sum(2) / foreground.sum(2).clamp_min(1.0)
    mean_bg = (error * background).sum(2) / background.sum(2).clamp_min(1.0)
    return mean_fg + mean_bg


def heatmap_loss(
    prediction: torch.Tensor, target: torch.Tensor, present: torch.Tensor, kind: str = "mse",
    missing_target: str = "mask",
) -> torch.Tensor:
    """Mean voxel loss over the supervised channels of ``(B, K, *spatial)`` heatmaps.

    ``present`` ``(B, K)`` marks landmarks inside the patch. With ``missing_target="mask"`` the
    other channels are left out; with ``"zero"`` they are trained toward an empty map (the
    target is already all zeros there), so the network learns "not present".
    """
    if kind == "balanced_mse":
        per_channel = _balanced_per_channel(prediction.float(), target.float())
    else:
        per_channel = VOXEL_LOSSES[kind](prediction.float(), target.float()).flatten(2).mean(dim=2)
    weights = present.float() if missing_target == "mask" else torch.ones_like(per_channel)
    return (per_channel * weights).sum() / weights.sum().clamp_min(1.0)
