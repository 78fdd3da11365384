"""Index <-> world conversions: exact round trips under oblique directions and anisotropic spacing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from medlandmark.errors import ImageError
from medlandmark.io.geometry import (
    Geometry,
    index_to_world,
    itk_index_to_world,
    lps_to_ras,
    ras_to_lps,
    world_to_index,
    world_to_itk_index,
)


def _rotation(ndim: int, seed: int) -> np.ndarray:
    if ndim == 3:
        return Rotation.random(random_state=seed).as_matrix()
    angle = np.random.default_rng(seed).uniform(-np.pi, np.pi)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


@st.composite
def geometries(draw) -> Geometry:
    """Random oblique, possibly mirrored directions with anisotropic spacing."""
    ndim = draw(st.sampled_from([2, 3]))
    direction = _rotation(ndim, draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        direction[:, 0] *= -1  # a reflection: still orthonormal
    spacing = draw(st.lists(st.floats(0.05, 8.0), min_size=ndim, max_size=ndim))
    origin = draw(st.lists(st.floats(-500, 500), min_size=ndim, max_size=ndim))
    shape = draw(st.lists(st.integers(1, 600), min_size=ndim, max_size=ndim))
    return Geometry(tuple(spacing), tuple(origin), tuple(map(tuple, direction)), tuple(shape))


@given(geometries(), st.integers(0, 2**31 - 1))
def test_index_world_round_trip_is_exact(geometry: Geometry, seed: int) -> None:
    rng = np.random.default_rng(seed)
    index = rng.uniform(-10, np.asarray(geometry.shape) + 10, size=(20, geometry.ndim))
    world = index_to_world(index, geometry)
    back_world = index_to_world(world_to_index(world, geometry), geometry)
    assert np.abs(back_world - world).max() < 1e-6
    assert np.abs(world_to_index(world, geometry) - index).max() * max(geometry.spacing_mm) < 1e-6


@given(geometries(), st.integers(0, 2**31 - 1))
def test_conversions_agree_with_simpleitk(geometry: Geometry, seed: int) -> None:
    """Our array-order geometry maps indices exactly where ITK's physical-point mapping does."""
    image = sitk.Image([min(n, 4) for n in geometry.shape[::-1]], sitk.sitkUInt8)
    spacing, origin, direction = geometry.to_itk()
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    index_xyz = np.random.default_rng(seed).uniform(-5, 50, size=geometry.ndim)
    expected = np.asarray(image.TransformContinuousIndexToPhysicalPoint(index_xyz.tolist()))
    assert np.abs(itk_index_to_world(index_xyz, geometry) - expected).max() < 1e-6
    assert np.abs(world_to_itk_index(expected, geometry) - index_xyz).max() < 1e-6


def test_step_along_array_axis_moves_by_spacing_along_direction_column() -> None:
    direction = _rotation(3, 7)
    geometry = Geometry(
        (3.0, 0.7, 0.5), (10.0, -20.0, 5.0), tuple(map(tuple, direction)), (10, 20, 30)
    )
    step = index_to_world([[0, 1, 0]], geometry) - index_to_world([[0, 0, 0]], geometry)
    assert np.allclose(step[0], 0.7 * direction[:, 1])


def test_itk_round_trip_of_geometry() -> None:
    direction = _rotation(3, 3)
    geometry = Geometry((3.0, 0.7, 0.5), (1.0, 2.0, 3.0), tuple(map(tuple, direction)), (4, 5, 6))
    assert Geometry.from_itk(*geometry.to_itk(), geometry.shape[::-1]) == geometry
    assert Geometry.from_dict(geometry.to_dict()) == geometry


def test_nan_points_stay_nan() -> None:
    geometry = Geometry.identity((10, 10), (0.5, 0.5))
    world = index_to_world(np.array([[np.nan, np.nan], [1.0, 2.0]]), geometry)
    assert np.isnan(world[0]).all() and not np.isnan(world[1]).any()
    assert not geometry.contains_world(world)[0]


def test_lps_ras_flip_first_two_axes_only() -> None:
    points = np.array([[1.0, -2.0, 3.0]])
    assert np.array_equal(lps_to_ras(points), [[-1.0, 2.0, 3.0]])
    assert np.array_equal(ras_to_lps(lps_to_ras(points)), points)


def test_contains_index_includes_voxel_edges() -> None:
    geometry = Geometry.identity((4, 5))
    inside = geometry.contains_index(np.array([[-0.5, -0.5], [3.5, 4.5], [3.51, 0.0], [0.0, -0.6]]))
    assert inside.tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    ("spacing", "direction", "needle"),
    [
        ((0.0, 1.0), ((1, 0), (0, 1)), "spacing"),
        ((-1.0, 1.0), ((1, 0), (0, 1)), "spacing"),
        ((np.nan, 1.0), ((1, 0), (0, 1)), "spacing"),
        ((1.0, 1.0), ((1, 0.5), (0, 1)), "orthonormal"),
    ],
)
def test_invalid_geometry_is_refused_with_reason(spacing, direction, needle) -> None:
    geometry = Geometry(spacing, (0.0, 0.0), direction, (3, 3))
    with pytest.raises(ImageError, match=needle):
        geometry.validated("case.nii.gz")


def test_resampled_geometry_keeps_field_of_view_edges_and_matches_torch_sampling() -> None:
    import torch

    from medlandmark.io.geometry import resampled_geometry

    geometry = Geometry((2.0, 0.5), (3.0, -4.0), ((0.6, -0.8), (0.8, 0.6)), (7, 10))
    resampled = resampled_geometry(geometry, (3, 25))
    for corner_old, corner_new in (([-0.5, -0.5], [-0.5, -0.5]), ([6.5, 9.5], [2.5, 24.5])):
        assert np.allclose(
            index_to_world(corner_old, geometry), index_to_world(corner_new, resampled)
        )
    ramp = np.arange(10, dtype=np.float64)[None, :].repeat(7, 0)  # value = old column index
    sampled = torch.nn.functional.interpolate(
        torch.from_numpy(ramp)[None, None], size=(3, 25), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    old_index = world_to_index(
        index_to_world(np.array([[1.0, j] for j in range(3, 22)]), resampled), geometry
    )
    np.testing.assert_allclose(sampled[1, 3:22], old_index[:, 1], atol=1e-9)


def test_transposed_and_cropped_geometry_follow_the_array() -> None:
    from medlandmark.io.geometry import cropped_geometry, transposed_geometry

    direction = _rotation(3, 11)
    geometry = Geometry((3.0, 0.7, 0.5), (1.0, 2.0, 3.0), tuple(map(tuple, direction)), (4, 5, 6))
    index = np.array([[1.0, 2.0, 3.0]])
    moved = transposed_geometry(geometry, (2, 0, 1))
    np.testing.assert_allclose(
        index_to_world(index[:, [2, 0, 1]], moved), index_to_world(index, geometry)
    )
    crop = cropped_geometry(geometry, (1, -2, 3), (2, 2, 2))
    np.testing.assert_allclose(
        index_to_world(index - [1, -2, 3], crop), index_to_world(index, geometry)
    )


@given(geometries(), st.integers(0, 2**31 - 1))
def test_reorientation_keeps_every_voxel_in_place_and_ends_nearest_identity(
    geometry: Geometry, seed: int
) -> None:
    from medlandmark.io.geometry import canonical_axes, reoriented_geometry
    from medlandmark.preprocessing import reoriented_array

    shape = tuple(min(n, 7) for n in geometry.shape)
    geometry = Geometry(geometry.spacing_mm, geometry.origin_mm, geometry.direction, shape)
    array = np.random.default_rng(seed).random((1, *shape))
    moved, canonical = reoriented_array(array, geometry)
    assert canonical == reoriented_geometry(geometry, *canonical_axes(geometry))
    # each voxel value sits at the same world position before and after
    old_index = np.argwhere(np.ones(shape, bool)).astype(float)
    new_index = world_to_index(index_to_world(old_index, geometry), canonical)
    np.testing.assert_allclose(new_index, np.round(new_index), atol=1e-6)
    np.testing.assert_array_equal(
        moved[0][tuple(np.round(new_index).astype(int).T)], array[0][tuple(old_index.astype(int).T)]
    )
    # array axis i runs along +world axis (ndim - 1 - i) more than along any other, and forward
    direction = canonical.direction_matrix[::-1]  # row i: world axis ndim - 1 - i
    assert np.all(np.diag(direction) > 0)
    assert (
        np.diag(np.abs(direction)).sum()
        >= max(
            sum(np.abs(direction)[i, p] for i, p in enumerate(order))
            for order in itertools.permutations(range(geometry.ndim))
        )
        - 1e-12
    )


def test_reorientation_of_axis_aligned_images_is_a_permutation_with_flips() -> None:
    from medlandmark.io.geometry import canonical_axes

    # direction columns are array axes (z, y, x): a NIfTI stored in RAS+ as ITK reads it
    ras_nifti = Geometry(
        (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((0, 0, -1), (0, -1, 0), (1, 0, 0)), (4, 5, 6)
    )
    assert canonical_axes(ras_nifti) == ([0, 1, 2], [False, True, True])  # A->P and R->L flipped
    lsp = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 0, 1), (0, 1, 0)), (4, 5, 6))
    assert canonical_axes(lsp) == ([1, 2, 0], [False, False, False])  # axes running L, S, P
    radiograph = Geometry.identity((2400, 1935), (0.1, 0.1))
    assert canonical_axes(radiograph) == ([0, 1], [False, False])
