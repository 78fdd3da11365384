"""The landmark constellation: a robust affine fit tells which landmarks a field of view cut off."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medlandmark.io.geometry import Geometry
from medlandmark.shape_model import (
    ShapeModel,
    affine_fit,
    apply_affine,
    fit_shape_model,
    rotation_deg_of,
)


def _random_affine(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A plausible pose change: rotation, scales 0.9-1.1, a shift of up to 10 mm."""
    q, _ = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    linear = q @ np.diag(rng.uniform(0.9, 1.1, ndim))
    return np.vstack([linear.T, rng.uniform(-10, 10, ndim)])


def _training_shapes(
    ndim: int, cases: int = 12, seed: int = 0
) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = rng.uniform(-40, 40, (14, ndim))
    shapes = [
        apply_affine(_random_affine(rng, ndim), base) + rng.normal(0, 0.5, base.shape)
        for _ in range(cases)
    ]
    shapes[3][5] = np.nan  # a missing landmark in training is allowed
    return base, shapes


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_model_learns_the_shape_and_its_variation(ndim):
    base, shapes = _training_shapes(ndim)
    model = fit_shape_model(shapes)
    assert model.reference_mm.shape == base.shape and np.isfinite(model.reference_mm).all()
    # the reference is the base shape up to an affine map, up to the noise
    matrix = affine_fit(model.reference_mm, base)
    assert np.abs(apply_affine(matrix, model.reference_mm) - base).max() < 1.0
    assert 0.5 < model.inlier_mm < 4.0  # four times the residual RMS (noise 0.5 mm per axis)
    low, high = model.singular_values
    assert 0.6 < low < 1.0 < high < 1.6
    again = ShapeModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert (
        np.array_equal(again.reference_mm, model.reference_mm)
        and again.inlier_mm == model.inlier_mm
    )


def test_no_model_from_too_few_cases_or_landmarks():
    _, shapes = _training_shapes(3)
    assert fit_shape_model(shapes[:2]) is None
    assert fit_shape_model([s[:7] for s in shapes]) is None  # 3D needs 8 landmarks
    assert fit_shape_model([s[:8] for s in shapes]) is not None


def test_a_landmark_never_seen_in_training_has_no_reference_and_no_verdict():
    _, shapes = _training_shapes(2)
    for shape in shapes:
        shape[0] = np.nan
    model = fit_shape_model(shapes)
    assert np.isnan(model.reference_mm[0]).all()
    assert model.to_dict()["reference_mm"][0] is None
    points = (
        apply_affine(_random_affine(np.random.default_rng(5), 2), np.nan_to_num(model.reference_mm))
        + 1000.0
    )
    geometry = Geometry.identity((10, 10))  # every expected position far outside this image
    cut = model.cut_off(points, np.ones(14, bool), geometry)
    assert not cut[0] and cut[1:].all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_expected_positions_ignore_outliers_and_cut_off_is_the_field_of_view(ndim):
    base, shapes = _training_shapes(ndim)
    model = fit_shape_model(shapes)
    rng = np.random.default_rng(7)
    truth = apply_affine(_random_affine(rng, ndim), base) + 60.0  # the case's landmarks, world mm
    found = truth + rng.normal(0, 0.5, truth.shape)
    found[[0, 1, 2]] = rng.uniform(0, 120, (3, ndim))  # confident peaks on look-alikes
    fit = model.expected(found, np.ones(14, bool))
    assert set(fit.inliers.tolist()) == set(range(3, 14))
    assert np.linalg.norm(fit.expected_mm - truth, axis=1).max() < 2.0
    # a field of view ending at world coordinate 60 along the first array axis (world axis ndim-1)
    shape = [120] * ndim
    shape[0] = 60
    geometry = Geometry.identity(shape)
    depth = geometry.depth_inside_mm(truth)
    inside = geometry.contains_world(truth)
    cut = model.cut_off(found, np.ones(14, bool), geometry)
    clear = np.abs(depth) > 2.0  # within the fit's error of the edge either answer is fair
    assert np.array_equal(cut[clear], ~inside[clear])


def test_too_few_agreeing_landmarks_give_no_fit_and_no_verdict():
    base, shapes = _training_shapes(3)
    model = fit_shape_model(shapes)
    scattered = np.random.default_rng(3).uniform(-200, 200, (14, 3))
    assert model.expected(scattered, np.ones(14, bool)) is None
    usable = np.zeros(14, bool)
    usable[:4] = True  # fewer than an affine fit plus one
    assert (
        model.expected(apply_affine(_random_affine(np.random.default_rng(1), 3), base), usable)
        is None
    )
    assert not model.cut_off(scattered, np.ones(14, bool), Geometry.identity((5, 5, 5))).any()


def test_an_implausible_map_is_not_a_fit():
    """Peaks squashed against an image edge fit an affine map that flattens the shape; the
    training range of singular values refuses it."""
    base, shapes = _training_shapes(3)
    model = fit_shape_model(shapes)
    flattened = apply_affine(np.vstack([np.diag([1.0, 1.0, 0.05]), np.zeros(3)]), base)
    assert model.expected(flattened, np.ones(14, bool)) is None


def test_depth_inside_is_signed_millimetres_to_the_nearest_face():
    geometry = Geometry((2.0, 1.0), (0.0, 0.0), ((1.0, 0.0), (0.0, 1.0)), (10, 20))  # 20 mm x 20 mm
    points = np.array([[9.0, 9.5], [-1.0, 0.0], [-3.0, 10.0], [5.0, 25.0], [np.nan, 0.0]])
    # array axis 0 runs along world x over [-1, 19] mm, array axis 1 along world y over [-0.5, 19.5]
    assert geometry.depth_inside_mm(points)[:4] == pytest.approx([10.0, 0.0, -2.0, -5.5])
    assert np.isnan(geometry.depth_inside_mm(points)[4])


def test_shape_outliers_and_the_peak_near_a_place():
    import torch

    from medlandmark.heatmaps import gaussian_heatmaps
    from medlandmark.inference.predictor import decode_near, shape_outliers

    base, shapes = _training_shapes(2)
    model = fit_shape_model(shapes)
    found = base + 100.0
    found[4] += [30.0, 0.0]  # on a look-alike 30 mm off
    present = np.ones(14, bool)
    present[7] = False
    geometry = Geometry.identity((250, 250))
    fit = model.expected(found, present)
    assert shape_outliers(model, fit, found, present, geometry).tolist() == [4]
    assert not len(shape_outliers(model, None, found, present, geometry))  # no fit: none
    expected = fit.expected_mm
    assert np.linalg.norm(expected[4] - (base[4] + 100.0)) < 2.0
    # two peaks: a strong one on the look-alike and a weaker one at the landmark
    index = np.array(
        [found[4][::-1], (base[4] + 100.0)[::-1]]
    )  # world (x, y) -> array (row, column)
    strong, _ = gaussian_heatmaps(torch.tensor(index[None, :1]), (250, 250), 2.0)
    weak, _ = gaussian_heatmaps(torch.tensor(index[None, 1:]), (250, 250), 2.0)
    heatmap = strong[0, 0] + 0.4 * weak[0, 0]
    point, peak, _ = decode_near(heatmap, geometry, expected[4], model.inlier_mm)
    assert np.linalg.norm(point - (base[4] + 100.0)) < 0.2 and peak == pytest.approx(0.4, abs=0.02)


def _turn(degrees: float, axis: int) -> np.ndarray:
    """A rotation ``(3, 3)`` by ``degrees`` about array axis ``axis``."""
    a = np.radians(degrees)
    i, j = [k for k in range(3) if k != axis]
    turn = np.eye(3)
    turn[i, i] = turn[j, j] = np.cos(a)
    turn[i, j], turn[j, i] = -np.sin(a), np.sin(a)
    return turn


def test_the_typical_orientation_turns_a_case_to_how_training_arrays_held_the_anatomy():
    rng = np.random.default_rng(3)
    base = rng.uniform(-40, 40, (14, 3))
    held = np.eye(3)[::-1] @ _turn(12, 0)  # how every training array held the anatomy (det -1)
    shapes, directions = [], []
    for angle, axis in [(0, 0), (10, 0), (-8, 1), (14, 2), (5, 1), (-12, 0), (9, 2)]:
        turn = _turn(angle, axis)  # the case's pose in the world
        shapes.append(base @ turn + rng.uniform(-10, 10, 3) + rng.normal(0, 0.2, base.shape))
        directions.append(turn.T @ held)  # its array axes: anatomy held the same way
    model = fit_shape_model(shapes, directions)
    assert model.typical_orientation is not None
    assert np.allclose(model.typical_orientation @ model.typical_orientation.T, np.eye(3))
    again = ShapeModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert np.allclose(again.typical_orientation, model.typical_orientation)

    case = base @ _turn(20, 1) @ _turn(-18, 2) + 7.0  # turned beyond every training case
    fit = model.expected(case, np.ones(len(case), dtype=bool))
    direction = model.window_direction(fit)
    # seen along the window's axes, the case's anatomy is held as the training arrays held it
    seen, trained = case @ direction, shapes[1] @ directions[1]
    assert rotation_deg_of(affine_fit(trained, seen)) < 1.0
    assert rotation_deg_of(affine_fit(shapes[1], case)) > 20.0  # and it was not before

    mirrored = model.expected(case * np.array([-1.0, 1.0, 1.0]), np.ones(len(case), dtype=bool))
    assert model.window_direction(mirrored) is None  # a mirrored fit is no guide
    too_far = model.expected(case @ _turn(40, 0), np.ones(len(case), dtype=bool))
    assert model.turns_too_far(too_far) and model.window_direction(too_far) is None
    assert fit_shape_model(shapes).window_direction(fit) is None  # no typical orientation known
