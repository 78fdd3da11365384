"""Any orientation (issue 17, item 2): the candidate moves of the voxels, their inverse in index
and world coordinates, the shape model's rotation limit, and the predictor's search."""

from __future__ import annotations

import numpy as np
import pytest

from medlandmark.io.geometry import Geometry, index_to_world
from medlandmark.io.images import ImageData
from medlandmark.preprocessing.orientation import candidate_orientations
from medlandmark.shape_model import ShapeModel, apply_affine, fit_shape_model, rotation_deg_of
from medlandmark.verdict import case_evidence, judge

RADIOGRAPH = Geometry((0.1, 0.1), (0.0, 0.0), ((0.0, 1.0), (1.0, 0.0)), (40, 30))  # ISBI-like
VOLUME = Geometry((1.0, 1.5, 2.0), (-5.0, 3.0, 7.0), tuple(map(tuple, np.eye(3))), (9, 8, 7))


@pytest.mark.parametrize("geometry", [RADIOGRAPH, VOLUME], ids=["2d", "3d"])
def test_every_candidate_moves_voxels_and_indices_alike_and_back(geometry: Geometry) -> None:
    rng = np.random.default_rng(0)
    candidates = candidate_orientations(geometry, turns=True)
    assert len(candidates) == 8 and candidates[0].is_identity
    assert len({(c.axes, c.flips) for c in candidates}) == 8
    for candidate in candidates:
        index = np.array([[rng.integers(n) for n in geometry.shape]])
        voxels = np.zeros((1, *geometry.shape), np.float32)
        voxels[(0, *index[0])] = 1.0
        moved = candidate.image(ImageData(voxels, geometry))
        found = np.argwhere(moved.array[0] == 1.0)
        np.testing.assert_array_equal(found, candidate.index(index, geometry.shape))
        assert moved.geometry.shape == moved.array.shape[1:]
        back = candidate.index_back(found.astype(float), geometry.shape)
        np.testing.assert_array_equal(back, index)
        world_in_moved = index_to_world(found.astype(float), moved.geometry)
        np.testing.assert_allclose(
            candidate.world_back(world_in_moved, geometry),
            index_to_world(index, geometry),
            atol=1e-9,
        )


def test_the_names_say_what_the_move_does_to_the_image_as_seen() -> None:
    voxels = np.arange(40 * 30, dtype=np.float32).reshape(1, 40, 30)
    image = ImageData(voxels, RADIOGRAPH)  # array axes: rows (up-down), columns (left-right)
    by_name = {c.name: c for c in candidate_orientations(RADIOGRAPH, turns=True)}
    expected = {
        "mirrored left-right": np.flip(voxels, 2),
        "mirrored up-down": np.flip(voxels, 1),
        "turned 180 degrees": np.rot90(voxels, 2, axes=(1, 2)),
        "turned 90 degrees": np.rot90(voxels, 1, axes=(1, 2)),  # counterclockwise
        "turned 270 degrees": np.rot90(voxels, 3, axes=(1, 2)),
    }
    for name, array in expected.items():
        np.testing.assert_array_equal(by_name[name].image(image).array, array, err_msg=name)
    assert len(candidate_orientations(RADIOGRAPH, turns=False)) == 4


def _turned(points: np.ndarray, degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ rotation.T


def test_a_constellation_turned_beyond_the_training_cases_fails() -> None:
    rng = np.random.default_rng(2)
    base = rng.uniform(-40, 40, (10, 2))
    shapes = [_turned(base, rng.uniform(-8, 8)) + rng.normal(0, 0.3, base.shape) for _ in range(12)]
    model = fit_shape_model(shapes)
    assert 20.0 < model.rotation_limit_deg < 20.0 + 16.5  # the most turned case + 20 degrees
    geometry = Geometry((1.0, 1.0), (-100.0, -100.0), ((1.0, 0.0), (0.0, 1.0)), (200, 200))
    names = [f"L{k}" for k in range(10)]
    upright = case_evidence(np.full(10, 0.9), np.ones(10, bool), shapes[0], model, geometry)
    assert not upright.turned and judge(upright, None, names).status == "ok"
    quarter = case_evidence(
        np.full(10, 0.9), np.ones(10, bool), _turned(shapes[0], 90), model, geometry
    )
    assert quarter.turned and abs(quarter.rotation_deg - 90) < 10
    verdict = judge(quarter, None, names)
    assert verdict.status == "failed" and "turned 9" in verdict.reasons[0]
    matrix = np.vstack([_turned(np.eye(2), 30).T * 1.3, [5.0, -2.0]])
    assert rotation_deg_of(matrix) == pytest.approx(30.0)
    assert rotation_deg_of(apply_affine(np.eye(3)[:, :2], np.eye(2))[None].reshape(2, 2)) == 0.0


class _Shape:
    """A shape model stand-in with the attributes the predictor reads."""

    minimum_points, handedness, rotation_limit_deg, inlier_mm = 1, 0, None, 1.0
    mirrors, turns_too_far = ShapeModel.mirrors, ShapeModel.turns_too_far
    plausible = ShapeModel.plausible

    def expected(self, points_mm, usable, seed: int = 0):
        return None

    def cut_off(self, points_mm, usable, geometry):
        return np.zeros(len(points_mm), dtype=bool)


def test_the_search_predicts_on_the_best_candidate_and_maps_the_points_back(
    tmp_path, monkeypatch
) -> None:
    """With an equivariant network (its heatmap is the image), whichever candidate is chosen,
    the landmark comes back where it is in the image as given, and the choice is reported."""
    from medlandmark.inference.predictor import Predictor
    from medlandmark.io.images import read_image

    from .test_predict import _blob_model, _identity_factory

    dataset, models, points = _blob_model(tmp_path, gpu_memory_gb=24.0)
    run = next(models.iterdir())
    image = read_image(dataset / "images" / "c1.nii.gz")
    for mode, wanted in [("search", "flipped axis 0 and axis 2"), ("fixed", "as given")]:
        predictor = Predictor.from_run(run, network_factory=_identity_factory, orientation=mode)
        predictor.stages[0].shape_model = _Shape()
        order = iter(range(8))  # the candidates in order; the sixth scores best

        def score(moved, order=order):
            return (1.0, 10.0 if next(order) == 5 else 1.0)

        monkeypatch.setattr(predictor, "_orientation_score", score)
        prediction = predictor.predict(image)
        assert prediction.orientation == wanted
        assert np.linalg.norm(prediction.landmarks.points_mm[0] - points[1]) < 0.05
    auto = Predictor.from_run(run, network_factory=_identity_factory)
    auto.stages[0].shape_model = _Shape()
    assert auto.predict(image).orientation == "as given"  # 3D headers are trusted by default
