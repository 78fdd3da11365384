"""Heatmap losses with missing landmarks masked out (or trained toward an empty map)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FOREGROUND_LEVEL = 0.1  # target value above which a voxel counts as the landmark's neighbourhood


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction - target).square().flatten(2).mean(dim=2)


def _smooth_l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(prediction, target, reduction="none", beta=0.1).flatten(2).mean(dim=2)


def _balanced_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the foreground and the background of each channel
    separately, then summed: a Gaussian covering 0.5 % of a patch weighs as much as the rest,
    so the network cannot settle on an empty map. An empty target's foreground is its
    brightest prediction, as many voxels as a landmark's neighbourhood: a peak where nothing
    is costs as much as no peak where a landmark is."""
    error = (prediction - target).square().flatten(2)
    foreground = (target > FOREGROUND_LEVEL).flatten(2).float()
    background = 1.0 - foreground
    counts = foreground.sum(2)
    mean_fg = (error * foreground).sum(2) / counts.clamp_min(1.0)
    mean_bg = (error * background).sum(2) / background.sum(2).clamp_min(1.0)
    empty = counts == 0
    if bool(empty.any()):
        mean_fg = torch.where(empty, _brightest_mean(error, counts), mean_fg)
    return mean_fg + mean_bg


def _brightest_mean(error: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of each channel's largest errors ``(B, K)``, over as many voxels as the median
    non-empty neighbourhood in ``counts`` (one voxel when every target is empty)."""
    sizes = counts[counts > 0]
    voxels = int(sizes.median().item()) if sizes.numel() else 1
    return error.topk(min(max(voxels, 1), error.shape[2]), dim=2).values.mean(2)


def _centroid_distance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distance between the centroids of the squared positive prediction and of the target, in
    units of the patch's longest side (0 for an empty target): mass left on a wrong structure
    far away costs in proportion to its distance, which the pixelwise losses do not see."""
    spatial = prediction.shape[2:]
    axes = [
        torch.arange(n, device=prediction.device, dtype=prediction.dtype) / max(spatial)
        for n in spatial
    ]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # (D, N)
    weight_p = prediction.clamp_min(0.0).square().flatten(2)
    weight_t = target.flatten(2)
    mass_t = weight_t.sum(2)
    centroid_p = weight_p @ grid.T / weight_p.sum(2, keepdim=True).clamp_min(1e-6)
    centroid_t = weight_t @ grid.T / mass_t.unsqueeze(2).clamp_min(1e-6)
    return (centroid_p - centroid_t).norm(dim=2) * (mass_t > 0)


def _balanced_mse_centroid(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``balanced_mse`` plus the centroid distance: suppresses confident peaks on look-alike
    structures far from the landmark."""
    return _balanced_mse(prediction, target) + _centroid_distance(prediction, target)


def _hard_negative_smooth_l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """H3DE-Net's loss on :func:`~medlandmark.heatmaps.radius_bump_heatmaps` targets: SmoothL1
    over the ``n`` voxels of the landmark's ball (target >= 0) plus SmoothL1 toward -1 over the
    ``n`` highest predictions outside it (hard negatives; ``n`` = 1 for an empty target).

    The official code meant the same but indexes its hard negatives by their rank among the
    negatives instead of by their voxel, so it trains arbitrary voxels; this trains the hardest.
    """
    prediction, target = prediction.flatten(2), target.flatten(2)
    positive = target >= 0
    counts = positive.sum(2)
    positive_loss = (F.smooth_l1_loss(prediction, target, reduction="none") * positive).sum(2)
    positive_loss = positive_loss / counts.clamp_min(1)
    wanted = counts.clamp_min(1)
    k = min(int(wanted.max()), prediction.shape[2])
    outside = prediction.masked_fill(positive, float("-inf"))
    hardest = outside.topk(k, dim=2).values
    rank = torch.arange(k, device=prediction.device)
    chosen = (rank < wanted.unsqueeze(2)) & torch.isfinite(hardest)
    errors = F.smooth_l1_loss(
        torch.where(chosen, hardest, -1.0), torch.full_like(hardest, -1.0), reduction="none"
    )
    negative_loss = (errors * chosen).sum(2) / chosen.sum(2).clamp_min(1)
    return positive_loss + negative_loss


# each maps (B, K, *spatial) prediction and target to a (B, K) loss per channel
CHANNEL_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": _mse,
    "smooth_l1": _smooth_l1,
    "balanced_mse": _balanced_mse,
    "balanced_mse_centroid": _balanced_mse_centroid,
    "hard_negative_smooth_l1": _hard_negative_smooth_l1,
}
HEATMAP_LOSSES = tuple(CHANNEL_LOSSES)


def heatmap_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor,
    kind: str = "mse",
    missing_target: str = "mask",
) -> torch.Tensor:
    """Mean channel loss over the supervised channels of ``(B, K, *spatial)`` heatmaps.

    ``present`` ``(B, K)`` marks landmarks inside the patch. With ``missing_target="mask"`` the
    other channels are left out; with ``"zero"`` they are trained toward an empty map (the
    target is already all zeros there), so the network learns "not present".
    """
    per_channel = CHANNEL_LOSSES[kind](prediction.float(), target.float())
    weights = present.float() if missing_target == "mask" else torch.ones_like(per_channel)
    return (per_channel * weights).sum() / weights.sum().clamp_min(1.0)
