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
    ones = [(1,) * len(patch_size)]
    return sliding_window_outputs(model, image, patch_size, ones, step, batch_size, amp_dtype)[0]


@torch.no_grad()
def sliding_window_outputs(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    step: float = 0.5,
    batch_size: int = 1,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Heatmaps ``(N, K, *spatial)`` of the first N outputs of ``model``, whose ``strides`` are
    given, each interpolated to full resolution within its window (a stride-s voxel q is
    centred at ``s*q + (s-1)/2``, as the training targets place it) before the stitching."""
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
            outputs = model(windows)
        heads = _full_resolution(outputs, strides, patch)  # (B, N, K, *patch)
        if total is None:
            total = torch.zeros((*heads.shape[1:3], *padded), device=image.device)
        for start, window_heads in zip(chunk, heads, strict=True):
            box = _box(start, patch)
            total[(slice(None), slice(None), *box)] += window_heads * weight
            norm[box] += weight
    total /= norm
    return total[(slice(None), slice(None), *(slice(0, s) for s in spatial))]


def head_strides(model: object, prediction: str, spatial_dims: int) -> list[tuple[int, ...]]:
    """The strides of the outputs a prediction rule decodes: the full-resolution output alone
    (``full_resolution``), or every output the network has (``mean_of_heads``, HYATT-Net's)."""
    if prediction == "full_resolution":
        return [(1,) * spatial_dims]
    if prediction != "mean_of_heads":
        raise ValueError(f"unknown prediction rule '{prediction}'")
    strides = getattr(model, "output_strides", None)
    if strides is None:
        raise ValueError(
            "the prediction rule mean_of_heads needs the PyTorch network (it knows its heads' "
            "strides); an exported ONNX file holds the full-resolution output only"
        )
    return [tuple(int(v) for v in s) for s in strides]


def _full_resolution(
    outputs: Sequence[torch.Tensor], strides: Sequence[Sequence[int]], patch: tuple[int, ...]
) -> torch.Tensor:
    """The first ``len(strides)`` outputs ``(B, K, *patch / stride)``, interpolated to ``patch``
    (linearly, align_corners=False) and stacked to ``(B, N, K, *patch)`` in float32."""
    if len(outputs) < len(strides):
        raise ValueError(
            f"the network gives {len(outputs)} output(s); the prediction needs {len(strides)}"
        )
    mode = "bilinear" if len(patch) == 2 else "trilinear"
    heads = []
    for output, stride in zip(outputs, strides, strict=False):
        output = output.float()
        if any(int(s) != 1 for s in stride):
            output = F.interpolate(output, size=patch, mode=mode, align_corners=False)
        heads.append(output)
    return torch.stack(heads, dim=1)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast to ``amp_dtype``; nothing at all without one (so any device type works)."""
    return (
        contextlib.nullcontext()
        if amp_dtype is None
        else torch.autocast(device.type, dtype=amp_dtype)
    )


def _box(start: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(a) + p) for a, p in zip(start, patch, strict=True))
