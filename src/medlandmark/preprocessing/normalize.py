"""Intensity normalisation per channel, as the plan says (CT: global clip + z-score; else per image)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medlandmark.records.plan import Normalization


def normalize_image(array: np.ndarray, schemes: Sequence[Normalization]) -> np.ndarray:
    """``(C, *spatial)`` voxels normalised channel by channel, as float32."""
    out = np.empty(array.shape, dtype=np.float32)
    for channel, scheme in enumerate(schemes):
        values = array[channel].astype(np.float32)
        if scheme.scheme == "ct":
            low, high = scheme.clip
            out[channel] = (np.clip(values, low, high) - scheme.mean) / scheme.std
        elif scheme.scheme == "zscore_per_image":
            out[channel] = (values - values.mean()) / max(float(values.std()), 1e-8)
        else:
            raise ValueError(f"unknown normalisation scheme {scheme.scheme!r}")
    return out
