"""Boxes cut from preprocessed arrays, zero-padded where they leave the array, either along the
array's axes or on a turned grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import map_coordinates

from medlandmark.io.geometry import Geometry, index_to_world, world_to_index


def crop_with_zeros(array: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """``array[:, start:start+shape]`` as float32, zero (the normalised mean) where the box
    leaves the array; ``start`` may be negative."""
    start = np.asarray(start, dtype=np.int64)
    shape = np.asarray(shape, dtype=np.int64)
    size = np.asarray(array.shape[1:], dtype=np.int64)
    out = np.zeros((array.shape[0], *shape), dtype=np.float32)
    low = np.clip(start, 0, size)
    high = np.clip(start + shape, 0, size)
    if np.all(high > low):
        source = (slice(None), *(slice(a, b) for a, b in zip(low, high, strict=True)))
        target = (
            slice(None),
            *(slice(a - s, b - s) for a, b, s in zip(low, high, start, strict=True)),
        )
        out[target] = array[source]
    return out


def sample_on_geometry(array: np.ndarray, geometry: Geometry, target: Geometry) -> np.ndarray:
    """The voxels ``(C, *shape)`` of ``array`` (on ``geometry``) at the voxel centres of
    ``target`` (any direction and spacing), trilinear, float32, zero (the normalised mean) where
    ``target`` leaves the array."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in target.shape], indexing="ij"), axis=-1)
    index = world_to_index(index_to_world(grid.reshape(-1, target.ndim), target), geometry)
    out = np.empty((array.shape[0], *target.shape), dtype=np.float32)
    for c in range(array.shape[0]):
        out[c] = map_coordinates(
            np.asarray(array[c], dtype=np.float32), index.T, order=1, mode="constant", cval=0.0
        ).reshape(target.shape)
    return out
