"""Full-resolution heatmaps of a whole (preprocessed) image from patch-sized windows.

Windows overlap by ``1 - step`` of the patch on every axis; each window's full-resolution output
is weighted by a Gaussian importance map (sigma = patch / 8, as nnU-Net) so that window borders,
where the network sees the least context, count the least.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medlandmark.models import channels_last


def window_starts(size: int, patch: int, step: float) -> list[int]:
    """First voxel of each window along one axis: evenly spread, ``step * patch`` apart at most."""
    if size <= patch:
        return [0]
    count = math.ceil((size - patch) / (patch * step)) + 1
    return [int(round(v)) for v in np.linspace(0, size - patch, count)]


@lru_cache(maxsize=8)
def _importance(patch: tuple[int, ...], device: str) -> torch.Tensor:
    axes = []
    for length in patch:
        coordinate = torch.arange(length, dtype=torch.float32) - (length - 1) / 2
        axes.append(torch.exp(-0.5 * (coordinate / (length / 8)) ** 2))
    weight = axes[0]
    for axis in axes[1:]:
        weight = weight[..., None] * axis
    weight = weight / weight.max()
    return weight.clamp_min(1e-3).to(device)


@torch.no_grad()
def sliding_window_heatmaps(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    step: float = 0.5,
    batch_size: int = 1,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Heatmaps ``(K, *spatial)`` of an image ``(C, *spatial)`` (on the model's device), from the
    first (full-resolution) output of ``model`` on Gaussian-weighted windows."""
    patch = tuple(int(p) for p in patch_size)
    spatial = tuple(image.shape[1:])
    padding = [max(0, p - s) for p, s in zip(patch, spatial, strict=True)]
    if any(padding):
        pad = [v for amount in reversed(padding) for v in (0, amount)]
        image = F.pad(image, pad)
    padded = tuple(image.shape[1:])
    grid = np.meshgrid(
        *[window_starts(s, p, step) for s, p in zip(padded, patch, strict=True)], indexing="ij"
    )
    starts = np.stack([g.ravel() for g in grid], axis=1)
    weight = _importance(patch, str(image.device))
    total, norm = None, torch.zeros(padded, device=image.device)
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        windows = channels_last(
            torch.stack([image[(slice(None), *_box(s, patch))] for s in chunk]), len(patch)
        )
        with _autocast(image.device, amp_dtype):
            heatmaps = model(windows)[0].float()
        if total is None:
            total = torch.zeros((heatmaps.shape[1], *padded), device=image.device)
        for start, heatmap in zip(chunk, heatmaps, strict=True):
            box = _box(start, patch)
            total[(slice(None), *box)] += heatmap * weight
            norm[box] += weight
    total /= norm
    return total[(slice(None), *(slice(0, s) for s in spatial))]


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast to ``amp_dtype``; nothing at all without one (so any device type works)."""
    return (
        contextlib.nullcontext()
        if amp_dtype is None
        else torch.autocast(device.type, dtype=amp_dtype)
    )


def _box(start: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(a) + p) for a, p in zip(start, patch, strict=True))
