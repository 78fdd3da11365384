"""Resampling matrices: exact on polynomials they should reproduce, sample where the geometry says."""

from __future__ import annotations

import numpy as np
import pytest

from medlandmark.io.geometry import Geometry, index_to_world, resampled_geometry, world_to_index
from medlandmark.preprocessing.resample import resample_image, resampling_matrix


@pytest.mark.parametrize("cubic", [True, False])
@pytest.mark.parametrize(("length_in", "length_out"), [(22, 19), (19, 22), (100, 37), (8, 40)])
def test_rows_sum_to_one_and_linear_ramps_are_reproduced(
    cubic: bool, length_in: int, length_out: int
) -> None:
    matrix = resampling_matrix(length_in, length_out, cubic)
    np.testing.assert_allclose(np.asarray(matrix.sum(axis=1)).ravel(), 1.0, atol=1e-12)
    ramp = np.arange(length_in, dtype=np.float64)
    expected = (np.arange(length_out) + 0.5) * length_in / length_out - 0.5
    reach = 2 * max(1.0, length_in / length_out) + 1  # rows whose taps all lie in the image
    inside = (expected >= reach) & (expected <= length_in - 1 - reach)
    np.testing.assert_allclose((matrix @ ramp)[inside], expected[inside], atol=1e-9)


def test_resampled_image_samples_where_the_resampled_geometry_says() -> None:
    geometry = Geometry(
        (3.0, 0.8, 1.1), (5.0, -3.0, 2.0), ((0, 0, 1), (0, 1, 0), (1, 0, 0)), (20, 50, 40)
    )
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), axis=-1)
    world = index_to_world(grid.reshape(-1, 3), geometry)
    plane = (0.3 * world[:, 0] - 0.2 * world[:, 1] + 0.1 * world[:, 2]).reshape(geometry.shape)
    new_shape = (29, 33, 61)
    out = resample_image(plane[None], new_shape, linear_axes=[0])[0]
    new = resampled_geometry(geometry, new_shape)
    new_grid = np.stack(np.meshgrid(*[np.arange(n) for n in new_shape], indexing="ij"), axis=-1)
    new_world = index_to_world(new_grid.reshape(-1, 3), new)
    expected = (0.3 * new_world[:, 0] - 0.2 * new_world[:, 1] + 0.1 * new_world[:, 2]).reshape(
        new_shape
    )
    old_index = world_to_index(new_world, geometry)
    margin = 5  # the stretched kernel's reach when shrinking 50 -> 33 samples, plus one
    inside = np.all(
        (old_index > margin) & (old_index < np.array(geometry.shape) - 1 - margin), axis=1
    )
    inside = inside.reshape(new_shape)
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-4)


def test_downsampling_is_antialiased() -> None:
    stripes = np.tile([1.0, -1.0], 50)[None, :]  # Nyquist-frequency pattern
    out = resample_image(stripes[None], (1, 33))[0]
    assert np.abs(out[:, 2:-2]).max() < 0.05  # without the stretched kernel this aliases to +-1
