"""Boxes cut from preprocessed arrays, zero-padded where they leave the array."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
