"""Training batches: patches drawn from the cache, augmented on the device, landmarks moved exactly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medlandmark.augment import AugmentConfig, augment_batch
from medlandmark.models import channels_last
from medlandmark.training.sampling import PatchSampler


@dataclass
class AugmentedBatches:
    """Batches of ``patch_size`` patches and their landmarks in patch voxels.

    ``spacing_mm`` (the cache's, per array axis) makes rotations rigid in millimetres on
    anisotropic voxels; ``pairs`` swap under a mirroring along ``mirror_axis``. Every batch is
    reproducible from ``(seed, rank, step)``.
    """

    sampler: PatchSampler
    patch_size: Sequence[int]
    augment: AugmentConfig
    spacing_mm: Sequence[float]
    pairs: Sequence[tuple[int, int]] = ()
    mirror_axis: int | None = None
    seed: int = 0
    rank: int = 0

    def batch(
        self, step: int, batch_size: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, *patch)`` (channels-last) and landmarks ``(B, K, D)`` of ``step``."""
        crops = self.sampler.batch(step, batch_size)
        images = torch.from_numpy(np.stack([c.image for c in crops])).to(device)
        points = torch.from_numpy(np.stack([c.points for c in crops])).float().to(device)
        generator = torch.Generator(device=device).manual_seed(self.step_seed(step))
        images, points = augment_batch(
            images,
            points,
            self.patch_size,
            self.augment,
            generator,
            self.pairs,
            self.mirror_axis,
            spacing_mm=self.spacing_mm,
        )
        return channels_last(images, images.ndim - 2), points

    def step_seed(self, step: int) -> int:
        """The augmentation seed of ``step`` on this rank."""
        return int(np.random.default_rng([self.seed, self.rank, step, 7]).integers(2**62))
