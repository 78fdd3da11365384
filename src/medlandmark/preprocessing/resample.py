"""Resampling on a regular grid, separably, one axis at a time, by sparse interpolation matrices.

Output voxel ``j`` of an axis resampled from ``N`` to ``M`` samples sits at input continuous
index ``x_j = (j + 0.5) * N / M - 0.5`` (the ``align_corners=False`` convention), exactly what
:func:`medlandmark.io.geometry.resampled_geometry` describes. Its value is a weighted sum of
inputs ``i`` with weights ``k((i - x_j) / s) / s``, ``k`` the Keys cubic (a = -0.5) or the
linear kernel and ``s = max(1, N / M)``: stretching the kernel when shrinking is the
antialiasing filter. Each row's weights are then tilted (by ``|w| * offset``) to have zero first moment about
``x_j`` (so no feature centroid moves by a fraction of a voxel, as a stretched kernel sampled
on the integer grid otherwise would) and renormalised to sum to one. Taps beyond the image
repeat its edge voxel.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import scipy.sparse


def _keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _linear(t: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(t), 0.0, None)


@lru_cache(maxsize=64)
def resampling_matrix(
    length_in: int, length_out: int, cubic: bool = True
) -> scipy.sparse.csr_matrix:
    """Sparse ``(length_out, length_in)`` matrix that resamples one axis."""
    scale = length_in / length_out
    stretch = max(1.0, scale)
    support = (2.0 if cubic else 1.0) * stretch
    centres = (np.arange(length_out) + 0.5) * scale - 0.5
    first = np.floor(centres - support).astype(int) + 1
    taps = int(np.ceil(2 * support)) + 1
    inputs = first[:, None] + np.arange(taps)[None, :]
    kernel = _keys_cubic if cubic else _linear
    offsets = inputs - centres[:, None]
    weights = kernel(offsets / stretch)
    weights /= weights.sum(axis=1, keepdims=True)
    first_moment = (weights * offsets).sum(axis=1, keepdims=True)
    spread = (np.abs(weights) * offsets**2).sum(axis=1, keepdims=True)  # > 0 unless one tap
    interior = ((inputs >= 0) & (inputs < length_in)).all(axis=1, keepdims=True)
    usable = interior & (spread > 1e-12)
    tilt = np.divide(first_moment, spread, out=np.zeros_like(first_moment), where=usable)
    weights -= tilt * offsets * np.abs(weights)
    weights /= weights.sum(axis=1, keepdims=True)
    rows = np.repeat(np.arange(length_out), taps)
    columns = np.clip(inputs, 0, length_in - 1).ravel()
    return scipy.sparse.csr_matrix(
        (weights.ravel(), (rows, columns)), shape=(length_out, length_in)
    )


def resample_axis(array: np.ndarray, axis: int, length: int, cubic: bool = True) -> np.ndarray:
    """Resample one axis of ``array`` to ``length`` samples; other axes are untouched."""
    if array.shape[axis] == length:
        return array
    moved = np.moveaxis(array, axis, 0)
    matrix = resampling_matrix(moved.shape[0], int(length), cubic).astype(array.dtype)
    out = matrix @ moved.reshape(moved.shape[0], -1)
    return np.moveaxis(np.asarray(out).reshape(int(length), *moved.shape[1:]), 0, axis)


def resample_image(
    array: np.ndarray, shape: Sequence[int], linear_axes: Sequence[int] = ()
) -> np.ndarray:
    """Resample ``(C, *spatial)`` voxels to ``shape``; axes in ``linear_axes`` are linear, the
    others cubic. Returns C-contiguous float32."""
    out = np.asarray(array, dtype=np.float32)
    for axis, length in enumerate(shape):
        out = resample_axis(out, axis + 1, int(length), cubic=axis not in linear_axes)
    return np.ascontiguousarray(out)


def resampled_shape(
    shape: Sequence[int], spacing_mm: Sequence[float], target_mm: Sequence[float]
) -> list[int]:
    """Voxel count per axis that samples the same field of view at ``target_mm``."""
    return [
        max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing_mm, target_mm, strict=True)
    ]
