"""Patches from the memory-mapped cache: a share centred near landmarks, the rest anywhere.

Every draw comes from a counter-based generator keyed by ``(seed, rank, step, sample)``: a
resumed run draws exactly what an uninterrupted one would, and each rank draws its own shard.
For the cascade's fine stage every patch is centred on a landmark, displaced by an offset
drawn from the coarse stage's error distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medlandmark.preprocessing import CachedCase
from medlandmark.preprocessing.crops import crop_with_zeros


@dataclass
class Crop:
    """Voxels ``(C, *crop)`` cut from a cached case (zeros outside it) and the landmarks in
    crop voxel indices ``(K, D)``; ``start`` is the crop's first voxel in the case."""

    case_id: str
    image: np.ndarray
    points: np.ndarray
    start: np.ndarray


def crop_case(case: CachedCase, start: Sequence[int], shape: Sequence[int]) -> Crop:
    """The box ``[start, start + shape)`` of a cached case, zero-padded where it leaves the image."""
    start = np.asarray(start, dtype=np.int64)
    return Crop(
        case.case_id, crop_with_zeros(case.image, start, shape), case.landmarks_index - start, start
    )


@dataclass
class PatchSampler:
    """Draws training crops: ``crop_size`` boxes (the patch plus room for rotation) whose
    centre is near a landmark with probability ``landmark_fraction``, else anywhere.

    ``fine_offset_sd_voxels`` switches to the cascade's fine stage: always centred on a present
    landmark, displaced by a normal offset with this standard deviation per axis.
    """

    cases: list[CachedCase]
    crop_size: Sequence[int]
    landmark_fraction: float = 0.33
    fine_offset_sd_voxels: Sequence[float] | None = None
    seed: int = 0
    rank: int = 0

    def rng(self, step: int, sample: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, step, sample])

    def centre(self, case: CachedCase, rng: np.random.Generator) -> np.ndarray:
        """A crop centre (voxel index) in ``case``."""
        size = np.asarray(case.image.shape[1:], dtype=np.float64)
        present = np.flatnonzero(~np.isnan(case.landmarks_index).any(axis=1))
        near_landmark = (
            self.fine_offset_sd_voxels is not None or rng.random() < self.landmark_fraction
        )
        if near_landmark and len(present):
            landmark = case.landmarks_index[rng.choice(present)]
            if self.fine_offset_sd_voxels is not None:
                return landmark + rng.normal(0.0, 1.0, len(size)) * np.asarray(
                    self.fine_offset_sd_voxels
                )
            half = np.asarray(self.crop_size) / 4.0  # the landmark anywhere in the middle half
            return landmark + rng.uniform(-half, half)
        return rng.uniform(0.0, size - 1.0)

    def sample(self, step: int, index: int) -> Crop:
        """Crop ``index`` of training step ``step`` (reproducible)."""
        rng = self.rng(step, index)
        case = self.cases[rng.integers(len(self.cases))]
        centre = self.centre(case, rng)
        start = np.round(centre - (np.asarray(self.crop_size) - 1) / 2.0).astype(np.int64)
        return crop_case(case, start, self.crop_size)

    def batch(self, step: int, batch_size: int, offset: int = 0) -> list[Crop]:
        """``batch_size`` crops of one step (``offset`` numbers them across gradient accumulation)."""
        return [self.sample(step, offset + i) for i in range(batch_size)]
