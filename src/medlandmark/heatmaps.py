"""Heatmap targets (sub-voxel Gaussians made on the device) and decoding (argmax + sub-voxel
refinement, presence, confidence).

Tensors are channels-first ``(B, K, *spatial)``, spatial axes in array order. Landmark
coordinates are continuous voxel indices in the same order (voxel i's centre is at i), shape
``(B, K, D)``; a NaN row is a missing landmark. 2D and 3D (any D) share one code path. A
stride-s output's voxel i is centred at full-resolution index ``s*i + (s-1)/2`` per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

Stride = int | float | Sequence[float] | Tensor
Sigma = float | Sequence[float] | Tensor

METHODS = ("auto", "gaussian_fit", "quadratic", "centroid", "argmax")
# Measured by benchmarks/decode.py (clean, noisy and non-Gaussian blobs, 2D and 3D).
AUTO_METHOD = "gaussian_fit"
DEFAULT_PRESENCE_THRESHOLD = 0.25  # targets peak at 1; a blank channel's peak is its noise
DEFAULT_WINDOW = 6  # voxels either side of the peak: the half-maximum ball of sigma <= 5
TARGET_LEVELS = {"gaussian": (0.0, 1.0), "radius_bump": (-1.0, 2.0)}  # (empty, peak) values
RADIUS_BUMP_VOXELS = 20.0  # H3DE-Net's target radius R, in input voxels of ...
RADIUS_BUMP_PATCH = 128  # ... its 128 x 128 x 64 patches: smaller patches get a smaller R
NO_MISSING_FRACTION = 0.5  # calibration without missing examples: half the lowest present peak
HALF_MAXIMUM = 0.5  # centroid and spread: the voxels above half the peak
FIT_LEVEL = 0.2  # gaussian_fit: the voxels above this fraction of the peak ...
FIT_REACH = 2.0  # ... and within this many spreads of the centroid (drops far noise spikes)


def points_at_stride(points: Tensor, stride: Stride) -> Tensor:
    """Full-resolution coordinates ``p`` -> coordinates ``(p - (s-1)/2) / s`` of a stride-s output."""
    step = _stride_tensor(stride, points)
    return (points - (step - 1) / 2) / step


def points_from_stride(points: Tensor, stride: Stride) -> Tensor:
    """Coordinates ``q`` of a stride-s output -> full-resolution ``s*q + (s-1)/2`` (the inverse)."""
    step = _stride_tensor(stride, points)
    return points * step + (step - 1) / 2


def gaussian_heatmaps(
    points: Tensor,
    shape: Sequence[int],
    sigma_voxels: Sigma,
    dtype: torch.dtype = torch.float32,
    truncate: float | None = 4.0,
) -> tuple[Tensor, Tensor]:
    """Targets ``(B, K, *shape)`` peaking at 1 on each (sub-voxel) point, zero for missing points,
    and ``present`` ``(B, K)``; made on ``points.device`` as a product of 1D Gaussians per axis.

    ``sigma_voxels``: a scalar, per axis ``(D,)``, or anything broadcastable to ``(B, K, D)``.
    ``truncate``: zero beyond that many sigmas along an axis (``None``: never).
    """
    points = _as_points(points)
    batch, channels, ndim = points.shape
    shape = tuple(int(n) for n in shape)
    if len(shape) != ndim:
        raise ValueError(f"shape {shape} has {len(shape)} axes, the points have {ndim}")
    work = torch.float64 if points.dtype == torch.float64 else torch.float32
    sigma = _sigma_tensor(sigma_voxels, (batch, channels, ndim), work, points.device)
    present = torch.isfinite(points).all(dim=-1)
    centre = points.to(work).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    heatmaps = None
    for axis, length in enumerate(shape):
        distance = torch.arange(length, device=points.device, dtype=work) - centre[..., axis, None]
        scale = sigma[..., axis, None]
        factor = torch.exp(-0.5 * (distance / scale) ** 2)
        if truncate is not None:
            factor = factor * (distance.abs() <= truncate * scale)
        if axis == 0:
            factor = factor * present[..., None]
        view = [batch, channels] + [1] * ndim
        view[2 + axis] = length
        factor = factor.to(dtype).view(view)
        heatmaps = factor if heatmaps is None else heatmaps * factor
    return heatmaps.contiguous(), present


def bump_radius_voxels(patch_size: Sequence[int]) -> float:
    """H3DE-Net's R for a patch: 20 voxels on its 128-voxel patches, scaled down with a smaller
    patch's largest side so that the ball covers the same share of it (5 voxels on 32^3)."""
    return RADIUS_BUMP_VOXELS * min(1.0, max(int(p) for p in patch_size) / RADIUS_BUMP_PATCH)


def radius_bump_heatmaps(
    points: Tensor, shape: Sequence[int], radius_voxels: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """H3DE-Net's targets ``(B, K, *shape)``: ``2 exp(-d^2 / (0.2 R^2))`` within ``R`` voxels
    of each point (2 at the point, 0.013 at the rim), -1 everywhere else and everywhere for
    missing points; and ``present`` ``(B, K)``."""
    points = _as_points(points)
    batch, channels, ndim = points.shape
    shape = tuple(int(n) for n in shape)
    if len(shape) != ndim:
        raise ValueError(f"shape {shape} has {len(shape)} axes, the points have {ndim}")
    present = torch.isfinite(points).all(dim=-1)
    centre = points.float().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    squared = None
    for axis, length in enumerate(shape):
        distance = torch.arange(length, device=points.device, dtype=torch.float32)
        view = [batch, channels] + [1] * ndim
        view[2 + axis] = length
        term = ((distance - centre[..., axis, None]) ** 2).view(view)
        squared = term if squared is None else squared + term
    inside = (squared <= radius_voxels**2) & present.view(batch, channels, *[1] * ndim)
    bump = 2.0 * torch.exp(-squared / (0.2 * radius_voxels**2))
    return torch.where(inside, bump, torch.full_like(bump, -1.0)).to(dtype), present


def deep_supervision_targets(
    points: Tensor,
    output_shapes: Sequence[Sequence[int]],
    output_strides: Sequence[Stride],
    sigma_voxels_per_output: Sequence[Sigma],
    dtype: torch.dtype = torch.float32,
    truncate: float | None = 4.0,
) -> tuple[list[Tensor], Tensor]:
    """One target per network output: full-resolution ``points`` moved to each output's stride,
    each with its sigma in that output's own voxels; and ``present`` ``(B, K)``."""
    if not len(output_shapes) == len(output_strides) == len(sigma_voxels_per_output):
        raise ValueError(
            f"{len(output_shapes)} output shapes, {len(output_strides)} strides and "
            f"{len(sigma_voxels_per_output)} sigmas: give one of each per output"
        )
    points = _as_points(points)
    targets = []
    for shape, stride, sigma in zip(
        output_shapes, output_strides, sigma_voxels_per_output, strict=True
    ):
        heatmaps, _ = gaussian_heatmaps(
            points_at_stride(points, stride), shape, sigma, dtype=dtype, truncate=truncate
        )
        targets.append(heatmaps)
    return targets, torch.isfinite(points).all(dim=-1)


@dataclass(frozen=True)
class DecodedLandmarks:
    """Decoded heatmaps: ``points`` (B, K, D) float32 voxel indices in array order (always the
    best guess, even when not present), ``peak`` (B, K) the heatmap maximum, ``spread``
    (B, K) and ``spread_per_axis`` (B, K, D) in voxels (the sigma a Gaussian of that
    half-maximum region would have; inf for a channel without a positive peak), ``argmax``
    (B, K, D) int64, ``present`` (B, K) = ``peak >= threshold``, and the ``method`` used."""

    points: Tensor
    peak: Tensor
    spread: Tensor
    spread_per_axis: Tensor
    argmax: Tensor
    present: Tensor
    method: str

    def masked_points(self) -> Tensor:
        """``points`` with NaN rows where the landmark is reported missing."""
        return torch.where(self.present[..., None], self.points, torch.nan)


def decode_heatmaps(
    heatmaps: Tensor,
    method: str = "auto",
    presence_threshold: float = DEFAULT_PRESENCE_THRESHOLD,
    window: int = DEFAULT_WINDOW,
) -> DecodedLandmarks:
    """Locate each channel's peak: integer argmax, then sub-voxel refinement by ``method``.

    - ``gaussian_fit``: least-squares fit of a full quadratic (any orientation) to log(h),
      weights h^2, over the blob's voxels above 0.2 of the peak in a ``window`` (+-voxels)
      and the peak's 3^D neighbourhood; exact for any Gaussian, averages noise.
    - ``quadratic``: Newton step on log(h) from central differences on the 3^D neighbourhood
      (per-axis parabolas when that fails; no refinement along an axis where the peak is on
      the border).
    - ``centroid``: centroid of ``(h - peak/2)^2`` where h > peak/2, in the window.
    - ``argmax``: the integer peak voxel.
    - ``auto``: the most accurate on the measurement of ``benchmarks/decode.py``.

    ``window`` should cover the blob's half-maximum region (1.2 sigma) for ``centroid`` and the
    spread. Heatmaps of any float dtype (e.g. bfloat16) are refined in float32.
    """
    if heatmaps.ndim < 3:
        raise ValueError(f"heatmaps must be (B, K, *spatial), got shape {tuple(heatmaps.shape)}")
    if method not in METHODS:
        raise ValueError(f"unknown decoding method '{method}' (choose from {', '.join(METHODS)})")
    method = AUTO_METHOD if method == "auto" else method
    if window < 1:
        raise ValueError(f"window must be at least 1 voxel, got {window}")
    batch, channels, *shape = heatmaps.shape
    flat = heatmaps.reshape(batch, channels, math.prod(shape))
    index = flat.argmax(dim=-1)
    peak = flat.gather(-1, index[..., None])[..., 0].float()
    argmax = _unravel(index, shape)
    values, valid, offsets = _window(flat, argmax, shape, window)
    spread_per_axis = _spread_per_axis(values, valid, offsets, peak)
    if method == "argmax":
        delta = torch.zeros_like(offsets[0]).expand(batch, channels, -1)
    elif method == "centroid":
        delta = _centroid_offsets(values, valid, offsets, peak)
    else:
        near, near_valid = _neighbourhood(values, valid, window, len(shape))
        delta = _newton_offsets(near, near_valid)
        if method == "gaussian_fit":
            delta = _gaussian_fit_offsets(
                values, valid, offsets, peak, window, delta, spread_per_axis
            )
    points = argmax.float() + delta
    upper = torch.tensor(shape, dtype=points.dtype, device=points.device) - 0.5
    points = torch.minimum(points.clamp(min=-0.5), upper)
    return DecodedLandmarks(
        points=points,
        peak=peak,
        spread=spread_per_axis.square().mean(dim=-1).sqrt(),
        spread_per_axis=spread_per_axis,
        argmax=argmax,
        present=peak >= presence_threshold,
        method=method,
    )


def decode_heads(heads: Tensor, strides: Sequence[Sequence[int]]) -> DecodedLandmarks:
    """HYATT-Net's prediction: the mean of the points decoded from each of ``heads``
    ``(N, K, *spatial)``, outputs of the given ``strides`` already interpolated to full
    resolution (each decoded in a window as many times wider as its stride); the peak, the
    spread and the presence are the first (full-resolution) head's. One batch item."""
    decoded = [
        decode_heatmaps(head[None], window=DEFAULT_WINDOW * max(int(s) for s in stride))
        for head, stride in zip(heads, strides, strict=True)
    ]
    points = torch.stack([d.points for d in decoded]).mean(dim=0)
    return replace(decoded[0], points=points)


def confidence_of(peaks: Tensor | np.ndarray, target: str = "gaussian") -> np.ndarray:
    """Heatmap peaks as confidences in [0, 1]: 0 at the empty level of the training targets
    (:data:`TARGET_LEVELS`), 1 at their peak; beyond either, clipped."""
    empty, top = TARGET_LEVELS[target]
    return np.clip((_numpy(peaks).astype(np.float64) - empty) / (top - empty), 0.0, 1.0)


def relative_confidences(confidence: np.ndarray) -> np.ndarray:
    """Confidences ``(..., K)`` over their case's reference level, the mean of the case's upper
    half: a contrast or noise that lowers every peak of a case leaves them where they were, and
    up to half of the landmarks may be absent without moving the reference."""
    values = np.asarray(confidence, dtype=np.float64)
    upper = np.sort(values, axis=-1)[..., values.shape[-1] // 2 :]
    return values / np.maximum(upper.mean(axis=-1, keepdims=True), 1e-6)


def calibrate_presence_threshold(
    peaks: Tensor | np.ndarray, truly_present: Tensor | np.ndarray
) -> float:
    """The presence threshold maximising balanced accuracy on validation ``peaks`` (any shape)
    whose landmarks were ``truly_present``; ties -> the middle of the tied thresholds.

    Without any missing landmark in validation this returns the conservative
    ``NO_MISSING_FRACTION`` (half) of the lowest present peak, so that landmarks are dropped
    only when far weaker than anything seen; without any present one, just above the highest
    peak. Non-finite peaks are ignored.
    """
    peaks = _numpy(peaks).astype(np.float64).ravel()
    truth = _numpy(truly_present).astype(bool).ravel()
    if peaks.shape != truth.shape:
        raise ValueError(f"{peaks.size} peaks but {truth.size} presence flags")
    finite = np.isfinite(peaks)
    peaks, truth = peaks[finite], truth[finite]
    if peaks.size == 0:
        raise ValueError("no finite peaks to calibrate the presence threshold on")
    present, missing = np.sort(peaks[truth]), np.sort(peaks[~truth])
    if missing.size == 0:
        return float(NO_MISSING_FRACTION * present[0])
    if present.size == 0:
        return float(np.nextafter(missing[-1], np.inf))
    levels = np.unique(peaks)
    candidates = np.concatenate([levels[:1], (levels[1:] + levels[:-1]) / 2])
    kept = 1.0 - np.searchsorted(present, candidates, side="left") / present.size
    dropped = np.searchsorted(missing, candidates, side="left") / missing.size
    accuracy = (kept + dropped) / 2
    best = np.flatnonzero(accuracy >= accuracy.max() - 1e-12)
    return float(candidates[best[len(best) // 2]])


def _as_points(points: Tensor) -> Tensor:
    points = torch.as_tensor(points)
    if not points.is_floating_point():
        points = points.float()
    if points.ndim != 3:
        raise ValueError(f"points must be (B, K, D), got shape {tuple(points.shape)}")
    return points


def _stride_tensor(stride: Stride, points: Tensor) -> Tensor:
    step = torch.as_tensor(stride, dtype=points.dtype, device=points.device)
    if step.ndim == 0:
        step = step.expand(points.shape[-1])
    if step.shape != (points.shape[-1],):
        raise ValueError(f"stride {tuple(step.tolist())} does not match {points.shape[-1]} axes")
    return step


def _sigma_tensor(
    sigma_voxels: Sigma, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    if not isinstance(sigma_voxels, Tensor):
        values = np.asarray(sigma_voxels, dtype=np.float64)
        if not (np.all(np.isfinite(values)) and np.all(values > 0)):
            raise ValueError(f"sigma_voxels must be positive and finite, got {sigma_voxels}")
    sigma = torch.as_tensor(sigma_voxels, dtype=dtype, device=device)
    try:
        return torch.broadcast_to(sigma, shape)
    except RuntimeError as error:
        raise ValueError(
            f"sigma_voxels of shape {tuple(sigma.shape)} does not broadcast to (B, K, D) = {shape}"
        ) from error


def _unravel(index: Tensor, shape: Sequence[int]) -> Tensor:
    """Flat indices (B, K) -> array-order voxel indices (B, K, D)."""
    coords = []
    for length in reversed(shape):
        coords.append(index % length)
        index = torch.div(index, length, rounding_mode="floor")
    return torch.stack(coords[::-1], dim=-1)


def _window(
    flat: Tensor, argmax: Tensor, shape: Sequence[int], radius: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Values (B, K, W) float32 and validity (B, K, W) of the (2r+1)^D voxels around each peak,
    and their offsets (W, D) from the peak."""
    batch, channels, ndim = argmax.shape
    steps = torch.arange(-radius, radius + 1, device=flat.device)
    linear, valid, stride = None, None, 1
    for axis in reversed(range(ndim)):
        index = argmax[..., axis, None] + steps
        inside = (index >= 0) & (index < shape[axis])
        view = [batch, channels] + [1] * ndim
        view[2 + axis] = steps.numel()
        term = (index.clamp(0, shape[axis] - 1) * stride).view(view)
        linear = term if linear is None else linear + term
        valid = inside.view(view) if valid is None else valid & inside.view(view)
        stride *= shape[axis]
    size = steps.numel() ** ndim
    linear = linear.reshape(batch, channels, size)
    valid = valid.reshape(batch, channels, size)
    values = flat.gather(-1, linear).float().masked_fill(~valid, 0.0)
    grids = torch.meshgrid(*[steps.float()] * ndim, indexing="ij")
    offsets = torch.stack([grid.reshape(-1) for grid in grids], dim=-1)
    return values, valid, offsets


def _neighbourhood(values: Tensor, valid: Tensor, radius: int, ndim: int) -> tuple[Tensor, Tensor]:
    """The 3^D voxels around the peak, (B, K, 3^D), from a window of ``radius``."""
    side = 2 * radius + 1
    middle = (slice(None), slice(None)) + (slice(radius - 1, radius + 2),) * ndim
    grid = values.shape[:2] + (side,) * ndim
    near = values.reshape(grid)[middle].reshape(*values.shape[:2], 3**ndim)
    near_valid = valid.reshape(grid)[middle].reshape(*values.shape[:2], 3**ndim)
    return near, near_valid


def _newton_offsets(near: Tensor, near_valid: Tensor) -> Tensor:
    """Sub-voxel offsets (B, K, D) from central differences of log(h) on the 3^D neighbourhood:
    a full Newton step where log(h) is concave there, else per-axis parabolas."""
    ndim = round(math.log(near.shape[-1], 3))
    centre = (near.shape[-1] - 1) // 2
    unit = [3 ** (ndim - 1 - axis) for axis in range(ndim)]
    usable = near_valid & (near > 0)
    logs = torch.where(usable, near, 1.0).log()
    gradient, curvature, per_axis = [], [], []
    for axis in range(ndim):
        plus, minus = centre + unit[axis], centre - unit[axis]
        use_log = usable[..., plus] & usable[..., minus] & usable[..., centre]
        both = near_valid[..., plus] & near_valid[..., minus]
        values = torch.where(use_log[..., None], logs, near)
        slope = (values[..., plus] - values[..., minus]) / 2
        bend = values[..., plus] - 2 * values[..., centre] + values[..., minus]
        step = torch.where(both & (bend < 0), -slope / bend.clamp(max=-1e-12), 0.0)
        per_axis.append(step.clamp(-0.5, 0.5))
        gradient.append((logs[..., plus] - logs[..., minus]) / 2)
        curvature.append(logs[..., plus] - 2 * logs[..., centre] + logs[..., minus])
    per_axis = torch.stack(per_axis, dim=-1)
    hessian = torch.diag_embed(torch.stack(curvature, dim=-1))
    for i in range(ndim):
        for j in range(i + 1, ndim):
            pp, mm = centre + unit[i] + unit[j], centre - unit[i] - unit[j]
            pm, mp = centre + unit[i] - unit[j], centre - unit[i] + unit[j]
            mixed = (logs[..., pp] - logs[..., pm] - logs[..., mp] + logs[..., mm]) / 4
            hessian[..., i, j] = mixed
            hessian[..., j, i] = mixed
    newton, ok = _concave_peak(hessian, torch.stack(gradient, dim=-1))
    ok = ok & usable.all(dim=-1) & (newton.abs() <= 1.0).all(dim=-1)
    return torch.where(ok[..., None], newton, per_axis)


def _gaussian_fit_offsets(
    values: Tensor,
    valid: Tensor,
    offsets: Tensor,
    peak: Tensor,
    radius: int,
    fallback: Tensor,
    spread: Tensor,
) -> Tensor:
    """Sub-voxel offsets (B, K, D) from a least-squares quadratic fit to log(h), weighted by
    h^2 (log noise ~ noise / h), over the voxels above ``FIT_LEVEL`` of the peak within
    ``FIT_REACH`` spreads of the centroid, and the 3^D neighbourhood; ``fallback`` where the
    fit fails."""
    ndim = offsets.shape[-1]
    x = offsets / radius  # scaled to [-1, 1] for conditioning
    pairs = [(i, j) for i in range(ndim) for j in range(i, ndim)]
    features = torch.cat(
        [torch.ones_like(x[:, :1]), x, torch.stack([x[:, i] * x[:, j] for i, j in pairs], dim=-1)],
        dim=-1,
    )
    scale = peak.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    relative = values / scale
    near = (offsets.abs() <= 1).all(dim=-1)
    centroid = _centroid_offsets(values, valid, offsets, peak)
    reach = (offsets - centroid[..., None, :]) / spread.clamp(min=0.5)[..., None, :]
    region = (relative > FIT_LEVEL) & (reach.square().sum(dim=-1) <= FIT_REACH**2)
    used = valid & (values > 0) & (region | near)
    weights = torch.where(used, relative.square(), 0.0)
    target = torch.where(used, relative, 1.0).log()
    weighted = weights[..., None] * features
    normal = weighted.transpose(-1, -2) @ features
    rhs = (weighted * target[..., None]).sum(dim=-2)
    enough = (used.sum(dim=-1) >= features.shape[-1]) & _spans_three_per_axis(used, radius, ndim)
    identity = torch.eye(features.shape[-1], device=values.device, dtype=values.dtype)
    # a whisper of ridge: coefficients the points cannot tell apart (cross terms at a corner) -> 0
    ridge = 1e-7 * normal.diagonal(dim1=-2, dim2=-1).sum(dim=-1)[..., None, None] * identity
    normal = torch.where(enough[..., None, None], normal + ridge, identity)
    coefficients, info = torch.linalg.solve_ex(normal, rhs)
    gradient = coefficients[..., 1 : 1 + ndim] / radius
    hessian = values.new_zeros(*values.shape[:2], ndim, ndim)
    for column, (i, j) in enumerate(pairs):
        quadratic = coefficients[..., 1 + ndim + column] / radius**2
        if i == j:
            hessian[..., i, i] = 2 * quadratic
        else:
            hessian[..., i, j] = quadratic
            hessian[..., j, i] = quadratic
    delta, ok = _concave_peak(hessian, gradient)
    ok = ok & enough & (info == 0) & (delta.abs() <= radius).all(dim=-1)
    return torch.where(ok[..., None], delta, fallback)


def _spans_three_per_axis(used: Tensor, radius: int, ndim: int) -> Tensor:
    """Whether the used voxels (B, K, W) take at least 3 distinct offsets along every axis (a
    parabola needs them; a peak on the border may have only 2)."""
    grid = used.reshape(*used.shape[:2], *(2 * radius + 1,) * ndim)
    spans = []
    for axis in range(ndim):
        others = tuple(2 + other for other in range(ndim) if other != axis)
        along = grid.any(dim=others) if others else grid
        spans.append(along.sum(dim=-1) >= 3)
    return torch.stack(spans, dim=-1).all(dim=-1)


def _concave_peak(hessian: Tensor, gradient: Tensor) -> tuple[Tensor, Tensor]:
    """The maximum ``-H^-1 g`` of a quadratic, and whether it is one (H negative definite)."""
    finite = torch.isfinite(hessian).all(dim=(-1, -2)) & torch.isfinite(gradient).all(dim=-1)
    identity = torch.eye(hessian.shape[-1], device=hessian.device, dtype=hessian.dtype)
    hessian = torch.where(finite[..., None, None], hessian, -identity)
    gradient = torch.where(finite[..., None], gradient, 0.0)
    _, not_concave = torch.linalg.cholesky_ex(-hessian)
    hessian = torch.where((not_concave == 0)[..., None, None], hessian, -identity)
    delta, info = torch.linalg.solve_ex(hessian, -gradient)
    ok = finite & (not_concave == 0) & (info == 0) & torch.isfinite(delta).all(dim=-1)
    return torch.where(ok[..., None], delta, 0.0), ok


def _centroid_offsets(values: Tensor, valid: Tensor, offsets: Tensor, peak: Tensor) -> Tensor:
    """Offsets (B, K, D) of the centroid of ``(h - peak/2)^2`` (where positive) in the window:
    squared so the weights vanish smoothly at the region's edge (less sampling bias)."""
    weights, _ = _half_maximum_weights(values, valid, peak)
    weights = weights.square()
    total = weights.sum(dim=-1)
    mean = (weights @ offsets) / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    return torch.where((total > 0)[..., None], mean, 0.0)


def _half_maximum_weights(values: Tensor, valid: Tensor, peak: Tensor) -> tuple[Tensor, Tensor]:
    weights = (values - HALF_MAXIMUM * peak[..., None]).clamp(min=0) * valid
    return weights, weights.sum(dim=-1)


def _spread_per_axis(values: Tensor, valid: Tensor, offsets: Tensor, peak: Tensor) -> Tensor:
    """Per-axis sigma (B, K, D) of a Gaussian with the same half-maximum-region second moments;
    inf where the peak is not positive."""
    weights, total = _half_maximum_weights(values, valid, peak)
    safe = total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    mean = (weights @ offsets) / safe
    variance = ((weights @ offsets.square()) / safe - mean.square()).clamp(min=0)
    spread = (variance / _half_maximum_variance_ratio(offsets.shape[-1])).sqrt()
    return torch.where((total > 0)[..., None], spread, torch.inf)


@lru_cache
def _half_maximum_variance_ratio(ndim: int, steps: int = 4096) -> float:
    """Per-axis second moment of ``(g - 1/2)+`` over sigma^2 for a unit Gaussian g in ``ndim``
    dimensions: the integral over radius r of r^2 (g - 1/2) r^(D-1), over D times its mass."""
    edge = math.sqrt(2 * math.log(2))
    moment = mass = 0.0
    for step in range(steps):
        r = (step + 0.5) * edge / steps
        weight = (math.exp(-0.5 * r * r) - 0.5) * r ** (ndim - 1)
        moment += r * r * weight
        mass += weight
    return moment / (mass * ndim)


def _numpy(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu()
        return values.numpy() if values.dtype == torch.bool else values.float().numpy()
    return np.asarray(values)
