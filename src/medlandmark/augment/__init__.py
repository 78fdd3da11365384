"""Data augmentation on torch tensors, on the device of the batch, moving landmarks exactly.

``augment_batch(images, points, patch_size, config, generator, pairs, mirror_axis)`` takes source
crops ``(B, C, *crop)`` (larger than the patch, so rotations bring in little padding) and
landmark voxel coordinates ``(B, K, D)`` of the crops (array axis order, NaN rows missing), and
returns patches ``(B, C, *patch_size)`` and the landmarks' coordinates in them:

1. a random spatial transform per sample (:mod:`medlandmark.augment.spatial`): rotation,
   isotropic and per-axis zoom, shear, translation, elastic deformation and mirroring, in one
   resampling; the patch centre lands on the crop centre plus the translation. Landmarks
   follow the same map (affine inverted analytically, elastic by fixed-point iteration to
   < 0.05 voxel); one pushed out of the patch becomes missing for that sample; a mirroring
   swaps the landmarks of each symmetric pair;
2. random intensity transforms (:mod:`medlandmark.augment.intensity`), which move nothing;
3. a field-of-view cut (:mod:`medlandmark.augment.field_of_view`, off by default): one side of a
   plane among the landmarks blanked to 0, its landmarks missing, as where a scan ends early.

All randomness comes from ``generator`` (a ``torch.Generator``; best on the batch's device, a CPU
one also drives CUDA batches, more slowly), so a seed reproduces a batch exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from medlandmark.augment.field_of_view import random_field_of_view_cut
from medlandmark.augment.intensity import augment_intensity
from medlandmark.augment.spatial import (
    MAX_INVERSE_RESIDUAL_VOXELS,
    SpatialTransform,
    random_spatial_transform,
    swap_pairs,
)

__all__ = [
    "MAX_INVERSE_RESIDUAL_VOXELS",
    "AugmentConfig",
    "SpatialTransform",
    "augment_batch",
    "augment_intensity",
    "random_field_of_view_cut",
    "random_spatial_transform",
]


class AugmentConfig(BaseModel):
    """What to augment, how often (``p_*``: per sample) and how much.

    Defaults follow nnU-Net where it has a counterpart (rotation, zoom 0.7-1.4, noise, blur,
    brightness, contrast, gamma, mirroring p=0.5). Elastic deformation is off by default, as in
    nnU-Net v2: it costs little here, but bends the anatomy the landmarks are defined on; switch
    it on with ``p_elastic``. Field-of-view cuts (``p_field_of_view_cut``) are off by default:
    they teach a network trained with ``missing_target="zero"`` that nothing lies past an
    image's edge. Translation is off by default because the patch sampler already
    chooses a random crop position. ``scale`` > 1 enlarges the anatomy in the patch. Padding
    (``zeros``: 0 is the mean of z-scored intensities; or ``border``, ``reflection``) fills only
    what the transform brings in from outside the crop.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    p_rotation: float = Field(0.2, ge=0.0, le=1.0)
    rotation_2d_deg: float = Field(30.0, ge=0.0, le=180.0, description="2D: angle in +-this")
    rotation_3d_deg: tuple[float, float, float] = Field(
        (30.0, 30.0, 30.0), description="3D: angles about array axes 0, 1, 2, each in +-this"
    )
    p_scale: float = Field(0.2, ge=0.0, le=1.0)
    scale: tuple[float, float] = (0.7, 1.4)
    p_axis_scale: float = Field(0.1, ge=0.0, le=1.0)
    axis_scale: tuple[float, float] = (0.9, 1.1)
    p_shear: float = Field(0.1, ge=0.0, le=1.0)
    shear: float = Field(0.1, ge=0.0, le=0.3, description="off-diagonal shear factors in +-this")
    p_translation: float = Field(0.0, ge=0.0, le=1.0)
    translation_voxels: float = Field(8.0, ge=0.0, description="shift per axis in +-this")
    p_elastic: float = Field(0.0, ge=0.0, le=1.0)
    elastic_magnitude_voxels: tuple[float, float] = Field(
        (1.0, 6.0), description="largest displacement component, in voxels of the patch"
    )
    elastic_spacing_voxels: float = Field(32.0, ge=2.0, description="control point spacing")
    p_mirror: float = Field(0.5, ge=0.0, le=1.0)
    padding_mode: Literal["zeros", "border", "reflection"] = "zeros"

    p_noise: float = Field(0.1, ge=0.0, le=1.0)
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_blur: float = Field(0.2, ge=0.0, le=1.0)
    blur_sigma_voxels: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = Field(0.15, ge=0.0, le=1.0)
    brightness: tuple[float, float] = (0.75, 1.25)
    p_brightness_shift: float = Field(0.1, ge=0.0, le=1.0)
    brightness_shift: tuple[float, float] = Field((-0.1, 0.1), description="in channel std units")
    p_contrast: float = Field(0.15, ge=0.0, le=1.0)
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = Field(0.3, ge=0.0, le=1.0)
    gamma: tuple[float, float] = (0.7, 1.5)
    p_field_of_view_cut: float = Field(
        0.0, ge=0.0, le=1.0, description="blank one side of a plane among the landmarks (missing)"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> AugmentConfig:
        for name in (
            "scale",
            "axis_scale",
            "elastic_magnitude_voxels",
            "noise_std",
            "blur_sigma_voxels",
            "brightness",
            "brightness_shift",
            "contrast",
            "gamma",
        ):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: low {low} is above high {high}")
        for name in ("scale", "axis_scale", "blur_sigma_voxels", "gamma"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if min(self.elastic_magnitude_voxels) < 0 or min(self.noise_std) < 0:
            raise ValueError("elastic magnitude and noise std cannot be negative")
        if any(not 0 <= a <= 180 for a in self.rotation_3d_deg):
            raise ValueError(f"rotation_3d_deg must lie in [0, 180], got {self.rotation_3d_deg}")
        if self.elastic_magnitude_voxels[1] > self.elastic_spacing_voxels / 4:
            raise ValueError(
                f"elastic magnitude {self.elastic_magnitude_voxels[1]} voxels exceeds a quarter of "
                f"the control spacing {self.elastic_spacing_voxels}: the deformation could fold; "
                "raise elastic_spacing_voxels or lower the magnitude"
            )
        return self

    @classmethod
    def identity(cls, **overrides: object) -> AugmentConfig:
        """A configuration that changes nothing (every probability 0), plus ``overrides``."""
        zeros = {name: 0.0 for name in cls.model_fields if name.startswith("p_")}
        return cls(**{**zeros, **overrides})


def augment_batch(
    images: Tensor,
    points: Tensor | None,
    patch_size: Sequence[int],
    config: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
    pairs: Sequence[tuple[int, int]] = (),
    mirror_axis: int | None = None,
    spacing_mm: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Augmented patches ``(B, C, *patch_size)`` of crops ``(B, C, *crop)`` and their landmarks.

    ``points`` ``(B, K, D)`` are crop voxel coordinates; the result holds patch voxel coordinates
    (on the images' device), NaN where missing or pushed out of the patch. Mirroring (along array
    axis ``mirror_axis``) happens only when symmetric ``pairs`` of landmark indices are declared;
    ``spacing_mm`` makes rotations rigid in millimetres on anisotropic voxels.
    """
    config = config or AugmentConfig()
    patch_size = tuple(int(p) for p in patch_size)
    _check_shapes(images, points, patch_size)
    mirror = mirror_axis if pairs and config.p_mirror > 0 else None
    transform = random_spatial_transform(
        images.shape[0],
        images.shape[2:],
        patch_size,
        config,
        generator,
        images.device,
        mirror_axis=mirror,
        spacing_mm=spacing_mm,
    )
    patches = transform.sample(images, padding_mode=config.padding_mode)
    moved = None
    if points is not None:
        moved, _ = transform.points_to_output(points.to(images.device))
        moved = swap_pairs(moved, pairs, transform.mirrored)
    patches = augment_intensity(patches, config, generator)
    if moved is not None:
        patches, moved = random_field_of_view_cut(
            patches, moved, config.p_field_of_view_cut, generator
        )
    return patches, moved


def _check_shapes(images: Tensor, points: Tensor | None, patch_size: tuple[int, ...]) -> None:
    ndim = len(patch_size)
    if ndim not in (2, 3) or images.dim() != ndim + 2:
        raise ValueError(
            f"images must be (B, C, *spatial) with {ndim} spatial axes for patch {patch_size}, "
            f"got shape {tuple(images.shape)}"
        )
    if min(patch_size) < 1:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    if points is not None and (
        points.dim() != 3 or points.shape[0] != images.shape[0] or points.shape[2] != ndim
    ):
        raise ValueError(
            f"points must be (B={images.shape[0]}, K, {ndim}), got {tuple(points.shape)}"
        )
