"""Augmentation moves landmarks exactly with the image: bright dots stay on the moved points."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medlandmark.augment import (
    MAX_INVERSE_RESIDUAL_VOXELS,
    AugmentConfig,
    augment_batch,
    random_spatial_transform,
)
from medlandmark.augment.intensity import (
    gaussian_blur,
    random_brightness,
    random_contrast,
    random_gamma,
    random_noise,
    random_shift,
)
from medlandmark.augment.spatial import crop_centre
from medlandmark.io.geometry import Geometry, left_right_axis
from medlandmark.io.landmarks import symmetric_pair_indices

SIGMA = 1.5
CASES = {  # crop, patch
    2: ((160, 150), (128, 120)),
    3: ((80, 76, 84), (64, 60, 64)),
}
DOTS = 8
TRANSFORMS = {  # each alone, then all together; (config, largest zoom, largest shift in voxels)
    "rotation": (
        dict(p_rotation=1.0, rotation_2d_deg=45.0, rotation_3d_deg=(30.0, 30.0, 30.0)),
        1.0,
        0.0,
    ),
    "scale": (dict(p_scale=1.0, scale=(0.7, 1.4)), 1.4, 0.0),
    "axis_scale": (dict(p_axis_scale=1.0, axis_scale=(0.8, 1.25)), 1.25, 0.0),
    "shear": (dict(p_shear=1.0, shear=0.15), 1.35, 0.0),
    "translation": (dict(p_translation=1.0, translation_voxels=5.5), 1.0, 5.5),
    "elastic": (
        dict(p_elastic=1.0, elastic_magnitude_voxels=(3.0, 4.0), elastic_spacing_voxels=16.0),
        1.0,
        4.0,
    ),
    "mirror": (dict(p_mirror=1.0), 1.0, 0.0),
    "combined": (
        dict(
            p_rotation=1.0,
            p_scale=1.0,
            scale=(0.9, 1.15),
            p_axis_scale=1.0,
            axis_scale=(0.9, 1.1),
            p_shear=1.0,
            shear=0.1,
            p_translation=1.0,
            translation_voxels=3.0,
            p_elastic=1.0,
            elastic_magnitude_voxels=(2.0, 4.0),
            elastic_spacing_voxels=16.0,
            p_mirror=1.0,
        ),
        1.6,
        7.0,
    ),
}
PAIRS = [(0, 1), (2, 3)]


def window_radius(zoom: float) -> int:
    """Half-width of the centroid window: 3 sigma of a dot enlarged by ``zoom``."""
    return math.ceil(3 * SIGMA * zoom)


def central_points(
    crop: tuple[int, ...], patch: tuple[int, ...], zoom: float, shift: float, seed: int
) -> torch.Tensor:
    """``(3, DOTS, D)`` sub-voxel points near the crop centre, kept well inside by the transform."""
    reach = ((min(patch) - 1) / 2 - window_radius(zoom) - 2 - shift) / zoom
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(3, DOTS, len(crop)))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    radius = reach * rng.uniform(0, 1, size=(3, DOTS, 1)) ** (1 / len(crop))
    return torch.tensor(
        np.array(crop_centre(crop, patch)) + direction * radius, dtype=torch.float32
    )


def dot_image(
    points: torch.Tensor,
    shape: tuple[int, ...],
    amplitudes: torch.Tensor | None = None,
    separate: bool = True,
) -> torch.Tensor:
    """Gaussians of ``SIGMA`` voxels at the points, ``(B, K, *shape)`` or summed ``(B, 1, ...)``."""
    profiles = [
        torch.exp(
            -0.5
            * ((torch.arange(n, dtype=torch.float64) - points[..., a, None].double()) / SIGMA) ** 2
        )
        for a, n in enumerate(shape)
    ]
    letters = "ijl"[: len(shape)]
    dots = torch.einsum(",".join(f"bk{c}" for c in letters) + f"->bk{letters}", *profiles)
    if amplitudes is not None:
        dots = dots * amplitudes.double().reshape(1, -1, *([1] * len(shape)))
    return (dots if separate else dots.sum(1, keepdim=True)).float()


def centroid(image: torch.Tensor, start: torch.Tensor, radius: int, steps: int = 6) -> torch.Tensor:
    """Intensity-weighted centroid in a cube of ``radius`` voxels, re-centred ``steps`` times."""
    centre = start.double()
    shape = torch.tensor(image.shape)
    for _ in range(steps):
        low = (centre.round().long() - radius).clamp(min=0)
        high = torch.minimum(centre.round().long() + radius + 1, shape)
        window = image[
            tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
        ].double()
        axes = torch.meshgrid(
            *[
                torch.arange(int(a), int(b), dtype=torch.float64)
                for a, b in zip(low, high, strict=True)
            ],
            indexing="ij",
        )
        weights = window.clamp_min(0)
        centre = torch.stack([(weights * a).sum() / weights.sum() for a in axes])
    return centre


def dot_errors(
    images: torch.Tensor, points: torch.Tensor, radius: int, channels: list[int] | None = None
) -> list[float]:
    """Distance from each landmark to the centroid of its dot (dot k in channel ``channels[k]``)."""
    channels = channels or list(range(points.shape[1]))
    patch = torch.tensor(images.shape[2:], dtype=torch.float32)
    errors = []
    for b in range(points.shape[0]):
        for k in range(points.shape[1]):
            p = points[b, k]
            assert (
                torch.isfinite(p).all() and (p >= radius).all() and (p <= patch - 1 - radius).all()
            ), p
            errors.append(
                float((centroid(images[b, channels[k]].float(), p, radius) - p.double()).norm())
            )
    return errors


@pytest.mark.parametrize("ndim", [2, 3])
def test_centroid_estimator_is_accurate_on_unaugmented_dots(ndim):
    crop, patch = CASES[ndim]
    points = central_points(crop, patch, 1.0, 0.0, seed=1)
    single = dot_image(points[:1, :1], crop, separate=False)
    assert float(centroid(single[0, 0], points[0, 0] + 0.7, 5).sub(points[0, 0]).norm()) < 0.01
    errors = dot_errors(dot_image(points, crop), points, radius=window_radius(1.0))
    assert max(errors) < 0.01


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_dots_follow_the_augmented_landmarks(ndim, name):
    crop, patch = CASES[ndim]
    settings, zoom, shift = TRANSFORMS[name]
    points = central_points(crop, patch, zoom, shift, seed=ndim)
    images = dot_image(points, crop)  # dot k in channel k
    config = AugmentConfig.identity(**settings)
    generator = torch.Generator().manual_seed(7)
    out, moved = augment_batch(
        images, points, patch, config, generator, pairs=PAIRS, mirror_axis=ndim - 1
    )
    assert out.shape == (3, DOTS, *patch)
    centred = points - (torch.tensor(crop_centre(crop, patch)) - (torch.tensor(patch) - 1) / 2)
    assert float((moved - centred).norm(dim=-1).max()) > 1.0, "the transform moved nothing"
    channels = [1, 0, 3, 2, *range(4, DOTS)] if config.p_mirror == 1.0 else None
    errors = dot_errors(out, moved, window_radius(zoom), channels)
    # the issue asks for 0.5 voxel; the dots sit within 0.2 (0.13 at worst, elastic 2D)
    assert max(errors) < 0.2, f"{name} {ndim}D: dot off its landmark by {max(errors):.3f} voxel"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_images_keep_dtype_and_dots(dtype):
    crop, patch = CASES[2]
    settings, zoom, shift = TRANSFORMS["combined"]
    points = central_points(crop, patch, zoom, shift, seed=5)
    images = dot_image(points, crop).to(dtype)
    config = AugmentConfig.identity(**settings)
    out, moved = augment_batch(images, points, patch, config, torch.Generator().manual_seed(3))
    assert out.dtype == dtype and out.shape == (3, DOTS, *patch)
    assert max(dot_errors(out.float(), moved, window_radius(zoom))) < 0.5


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("spacing", [16.0, 32.0])
def test_elastic_inverse_round_trips_below_tolerance(ndim, spacing):
    patch = (96, 80) if ndim == 2 else (40, 48, 36)
    magnitude = spacing / 4  # the largest the configuration allows
    config = AugmentConfig.identity(
        p_elastic=1.0,
        elastic_magnitude_voxels=(magnitude, magnitude),
        elastic_spacing_voxels=spacing,
    )
    transform = random_spatial_transform(16, patch, patch, config, torch.Generator().manual_seed(0))
    field = transform.displacement()
    assert float(field.abs().amax()) == pytest.approx(magnitude, rel=1e-5)
    voxels = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in patch], indexing="ij"), -1
    )
    at_voxels = transform.elastic_at(voxels.reshape(1, -1, ndim).expand(16, -1, -1))
    assert torch.allclose(
        at_voxels, field.flatten(2).transpose(1, 2), atol=1e-4
    )  # image and points agree
    inside = torch.rand(16, 50, ndim, generator=torch.Generator().manual_seed(1)) * (
        torch.tensor(patch) - 1
    )
    source = transform.points_to_input(inside)
    back, residual = transform.points_to_output(source)
    assert float(residual.max()) < MAX_INVERSE_RESIDUAL_VOXELS
    assert float((back - inside).abs().max()) < MAX_INVERSE_RESIDUAL_VOXELS


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_is_the_exact_centre_crop(ndim):
    crop, patch = ((41, 50), (32, 27)) if ndim == 2 else ((20, 17, 30), (16, 16, 25))
    images = torch.randn(2, 3, *crop)
    points = torch.rand(2, 4, ndim) * (torch.tensor(crop) - 1)
    out, moved = augment_batch(
        images, points, patch, AugmentConfig.identity(), torch.Generator().manual_seed(0)
    )
    start = [(s - p) // 2 for s, p in zip(crop, patch, strict=True)]
    region = tuple(slice(a, a + p) for a, p in zip(start, patch, strict=True))
    assert torch.equal(out, images[(slice(None), slice(None), *region)])
    shifted = points - torch.tensor(start, dtype=torch.float32)
    inside = ((shifted >= -0.5) & (shifted <= torch.tensor(patch) - 0.5)).all(-1)
    assert torch.equal(moved[inside], shifted[inside])
    assert torch.isnan(moved[~inside]).all()


def test_landmarks_pushed_out_of_the_patch_become_missing():
    images = torch.zeros(1, 1, 64, 64)
    points = torch.tensor(
        [[[15.4, 30.0], [16.0, 30.0], [47.4, 30.0], [47.6, 30.0], [math.nan, math.nan]]]
    )
    _, moved = augment_batch(images, points, (32, 32), AugmentConfig.identity())
    assert torch.isnan(moved[0, [0, 3, 4]]).all()
    assert torch.equal(moved[0, 1], torch.tensor([0.0, 14.0]))
    assert torch.allclose(moved[0, 2], torch.tensor([31.4, 14.0]))

    config = AugmentConfig.identity(p_translation=1.0, translation_voxels=12.0)
    centre = torch.full((8, 1, 2), 31.5)
    _, moved = augment_batch(
        torch.zeros(8, 1, 64, 64),
        centre + torch.tensor([14.0, 0.0]),
        (32, 32),
        config,
        torch.Generator().manual_seed(2),
    )
    transform = random_spatial_transform(
        8, (64, 64), (32, 32), config, torch.Generator().manual_seed(2)
    )
    expected = (centre + torch.tensor([14.0, 0.0]) - transform.offset[:, None]).squeeze(1)
    outside = (expected[:, 0] > 31.5) | (expected[:, 0] < -0.5)
    assert outside.any() and (~outside).any()
    assert torch.isnan(moved[outside, 0]).all() and torch.isfinite(moved[~outside, 0]).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_mirroring_swaps_the_pair_landmarks(ndim):
    crop, patch = CASES[ndim]
    centre = torch.tensor(crop, dtype=torch.float32) / 2
    side = torch.zeros(ndim)
    side[-1] = 12.0
    points = torch.stack([centre - side, centre + side, centre + torch.roll(side, 1)])[
        None
    ]  # left, right, middle
    amplitudes = torch.tensor([1.0, 2.0, 3.0])
    images = dot_image(points, crop, amplitudes, separate=False)
    config = AugmentConfig.identity(p_mirror=1.0)
    out, moved = augment_batch(images, points, patch, config, pairs=[(0, 1)], mirror_axis=ndim - 1)
    plain, unmoved = augment_batch(images, points, patch, AugmentConfig.identity())
    assert torch.equal(out, plain.flip(-1))
    mirror = unmoved.clone()
    mirror[..., -1] = patch[-1] - 1 - mirror[..., -1]
    assert torch.allclose(moved, mirror[:, [1, 0, 2]])
    for k, amplitude in enumerate([2.0, 1.0, 3.0]):  # the left landmark now sits on the right dot
        peak = out[(0, 0, *moved[0, k].round().long())]
        assert float(peak) == pytest.approx(amplitude, rel=0.02)


def test_no_pairs_means_no_mirroring():
    crop, patch = CASES[2]
    points = central_points(crop, patch, 1.0, 0.0, seed=3)
    images = torch.randn(3, 1, *crop)
    config = AugmentConfig.identity(p_mirror=1.0)
    out, moved = augment_batch(images, points, patch, config, pairs=(), mirror_axis=1)
    plain, unmoved = augment_batch(images, points, patch, AugmentConfig.identity())
    assert torch.equal(out, plain) and torch.equal(moved.nan_to_num(-1), unmoved.nan_to_num(-1))
    out, _ = augment_batch(images, points, patch, config, pairs=[(0, 1)], mirror_axis=None)
    assert torch.equal(out, plain)


def test_same_seed_same_batch_other_seed_other_batch():
    crop, patch = CASES[3]
    images = torch.randn(3, 1, *crop)
    points = central_points(crop, patch, 1.0, 0.0, seed=4)
    config = AugmentConfig(**TRANSFORMS["combined"][0], p_noise=1.0, p_gamma=1.0)
    runs = [
        augment_batch(images, points, patch, config, torch.Generator().manual_seed(s))
        for s in (11, 11, 12)
    ]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1].nan_to_num(-1), runs[1][1].nan_to_num(-1))
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_intensity_transforms_move_nothing(dtype):
    crop, patch = CASES[2]
    points = central_points(crop, patch, 1.0, 0.0, seed=6)
    images = dot_image(points, crop).to(dtype)
    config = AugmentConfig.identity(
        p_noise=1.0,
        p_blur=1.0,
        p_brightness=1.0,
        p_brightness_shift=1.0,
        p_contrast=1.0,
        p_gamma=1.0,
    )
    out, moved = augment_batch(images, points, patch, config, torch.Generator().manual_seed(0))
    plain, unmoved = augment_batch(images, points, patch, AugmentConfig.identity())
    assert out.shape == plain.shape and out.dtype == dtype
    assert not torch.equal(out, plain)
    assert torch.equal(moved.nan_to_num(-1), unmoved.nan_to_num(-1))
    assert max(dot_errors(out.float(), moved, window_radius(1.0))) < 0.5


def test_each_intensity_transform_does_what_it_says():
    images = torch.rand(4, 2, 24, 20) * 3 + 1
    generator = torch.Generator().manual_seed(0)
    dims = (2, 3)
    gamma = random_gamma(images, (0.5, 0.6), 1.0, generator)
    assert torch.allclose(gamma.amin(dims), images.amin(dims)) and torch.allclose(
        gamma.amax(dims), images.amax(dims)
    )
    assert (gamma.mean(dims) > images.mean(dims)).all()  # gamma < 1 brightens
    contrast = random_contrast(images, (0.5, 0.5), 1.0, generator)
    assert torch.allclose(contrast.mean(dims), images.mean(dims), atol=1e-5)
    assert torch.allclose(contrast.std(dims), images.std(dims) * 0.5, rtol=1e-4)
    assert torch.allclose(random_brightness(images, (2.0, 2.0), 1.0, generator), images * 2)
    shifted = random_shift(images, (1.0, 1.0), 1.0, generator)
    assert torch.allclose(
        shifted - images, images.std(dims, keepdim=True).expand_as(images), atol=1e-5
    )
    noisy = random_noise(images, (0.5, 0.5), 1.0, generator)
    assert float((noisy - images).std()) == pytest.approx(0.5, rel=0.05)
    assert torch.equal(random_noise(images, (0.5, 0.5), 0.0, generator), images)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_blur_keeps_mass_and_centre_of_a_point(ndim):
    shape = (27, 31, 29)[-ndim:]
    images = torch.zeros(2, 1, *shape)
    centre = tuple(n // 2 for n in shape)
    images[(slice(None), 0, *centre)] = 1.0
    blurred = gaussian_blur(images, torch.tensor([0.8, 2.0]))
    assert torch.allclose(blurred.sum(tuple(range(1, ndim + 2))), torch.ones(2), atol=1e-5)
    assert float(blurred[(1, 0, *centre)]) < float(blurred[(0, 0, *centre)]) < 1.0
    assert torch.allclose(blurred, blurred.flip(tuple(range(2, ndim + 2))), atol=1e-6)


def test_rotation_with_spacing_is_rigid_in_millimetres():
    spacing = (2.0, 0.5)
    config = AugmentConfig.identity(p_rotation=1.0, rotation_2d_deg=40.0)
    transform = random_spatial_transform(
        8, (80, 80), (64, 64), config, torch.Generator().manual_seed(1), spacing_mm=spacing
    )
    points = torch.tensor([[[30.0, 30.0], [35.0, 50.0], [20.0, 45.0]]]).expand(8, 3, 2)
    moved, _ = transform.points_to_output(points)
    mm = torch.tensor(spacing)

    def distances(p):
        return torch.cdist(p * mm, p * mm)

    assert torch.allclose(distances(moved), distances(points), atol=1e-4)
    assert not torch.allclose(moved[0], moved[1])


def test_helpers_and_config_validation():
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)[:, ::-1], (10, 10, 10))
    assert left_right_axis(geometry) == 2
    assert symmetric_pair_indices(["A", "L", "R"], [("L", "R")]) == [(1, 2)]
    with pytest.raises(ValueError, match="Q"):
        symmetric_pair_indices(["A"], [("A", "Q")])
    with pytest.raises(ValueError, match="fold"):
        AugmentConfig(elastic_magnitude_voxels=(1.0, 20.0), elastic_spacing_voxels=32.0)
    with pytest.raises(ValueError, match="above"):
        AugmentConfig(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="points must be"):
        augment_batch(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2, 3), (4, 4))
    with pytest.raises(ValueError, match="symmetric pair"):
        augment_batch(
            torch.zeros(1, 1, 8, 8),
            torch.zeros(1, 2, 2),
            (4, 4),
            AugmentConfig.identity(p_mirror=1.0),
            pairs=[(0, 5)],
            mirror_axis=0,
        )


@pytest.mark.parametrize("ndim", [2, 3])
def test_field_of_view_cut_blanks_one_side_and_drops_its_landmarks(ndim):
    from medlandmark.augment import random_field_of_view_cut

    shape = (24, 20, 22)[:ndim]
    generator = torch.Generator().manual_seed(3)
    images = torch.rand((16, 1, *shape), generator=generator) + 1.0  # nowhere 0 before the cut
    points = torch.rand((16, 6, ndim), generator=generator) * (torch.tensor(shape) - 1)
    points[0, 2] = math.nan
    cut_images, cut_points = random_field_of_view_cut(
        images, points, 1.0, torch.Generator().manual_seed(0)
    )
    assert torch.equal(points[0, 2].isnan(), torch.ones(ndim, dtype=torch.bool))  # inputs untouched
    for b in range(16):
        blank = cut_images[b, 0] == 0
        assert blank.any() or not cut_points[b].isnan().any()
        kept = (~blank).nonzero().float()
        low, high = (
            kept.min(0).values - 0.5,
            kept.max(0).values + 0.5,
        )  # the remaining field of view
        before = torch.isfinite(points[b]).all(-1)
        after = torch.isfinite(cut_points[b]).all(-1)
        inside = ((points[b] >= low) & (points[b] <= high)).all(-1)
        assert torch.equal(after, before & inside)
        assert after.any()  # the cut falls among the landmarks: one at least stays
        assert torch.equal(cut_points[b][after], points[b][after])
        assert torch.equal(cut_images[b][:, ~blank], images[b][:, ~blank])
        # the blank part is a slab on one side of one axis
        assert int(blank.sum()) == blank.numel() - int(np.prod((high - low).round().int().tolist()))
    assert cut_points.isnan().any(-1).sum() > points.isnan().any(-1).sum()
    again, _ = random_field_of_view_cut(images, points, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(again, cut_images)
    same, same_points = random_field_of_view_cut(
        images, points, 0.0, torch.Generator().manual_seed(0)
    )
    assert same is images and same_points is points


def test_field_of_view_cut_is_off_by_default_and_on_through_the_config():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand((8, 1, 40, 36), generator=generator) + 1.0
    points = torch.rand((8, 5, 2), generator=generator) * 20 + 8
    identity = AugmentConfig.identity()
    _, kept = augment_batch(images, points, (32, 28), identity, torch.Generator().manual_seed(2))
    cut, dropped = augment_batch(
        images,
        points,
        (32, 28),
        AugmentConfig.identity(p_field_of_view_cut=1.0),
        torch.Generator().manual_seed(2),
    )
    assert not kept.isnan().any()
    assert dropped.isnan().any(-1).sum() > 0
    assert all(bool((cut[b] == 0).any()) for b in range(8))
