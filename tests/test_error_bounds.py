"""Error bounds in mm (issue 17, item 3): split conformal radii calibrated on validation errors,
carried by every output format, drawn in overlays, and their coverage measured by evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medlandmark import metrics
from medlandmark.evaluation import evaluate
from medlandmark.io.geometry import Geometry
from medlandmark.io.images import ImageData
from medlandmark.io.landmarks import LandmarkSet, read_landmarks, write_landmarks
from medlandmark.overlays import figure_2d


def test_the_conformal_radius_is_the_right_order_statistic() -> None:
    errors = np.arange(1.0, 10.0)  # 9 validation errors
    assert metrics.conformal_radius_mm(errors, 0.9) == 9.0  # rank ceil(10 x 0.9) = 9
    assert metrics.conformal_radius_mm(errors, 0.5) == 5.0
    assert metrics.conformal_radius_mm(errors[:5], 0.9) is None  # rank 6 of 5: too few
    assert metrics.conformal_radius_mm(np.array([np.nan, 1.0]), 0.5) == 1.0  # NaN not evaluated


def test_conformal_radii_cover_new_points_at_the_level() -> None:
    """Exchangeable errors: the coverage over many calibrations is at least the level, and not
    more than level + 1 / (n + 1) (the split conformal guarantee)."""
    rng = np.random.default_rng(0)
    n, coverages = 30, []
    for _ in range(400):
        radius = metrics.conformal_radius_mm(rng.gamma(2.0, 0.7, n), 0.9)
        coverages.append(np.mean(rng.gamma(2.0, 0.7, 2000) <= radius))
    assert 0.9 <= np.mean(coverages) <= 0.9 + 1 / (n + 1) + 0.005


def test_a_landmark_without_enough_validation_points_takes_the_pooled_radius() -> None:
    errors = np.column_stack([np.linspace(1, 3, 20), np.full(20, np.nan)])
    errors[:3, 1] = [1.0, 1.5, 2.0]
    radii = metrics.conformal_radii_mm(errors, 0.9)
    assert radii[0] == metrics.conformal_radius_mm(errors[:, 0], 0.9)
    assert radii[1] == metrics.conformal_radius_mm(errors, 0.9)  # 3 points: too few alone
    assert metrics.conformal_radii_mm(np.full((3, 2), np.nan)) is None


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_error_bounds_round_trip_through_the_landmark_files(tmp_path: Path, suffix: str) -> None:
    landmarks = LandmarkSet(
        ["a", "b"],
        np.array([[1.0, 2.0], [np.nan, np.nan]]),
        confidence=np.array([0.9, 0.1]),
        error_bound_mm=np.array([1.25, np.nan]),
    )
    write_landmarks(tmp_path / f"p{suffix}", landmarks)
    back = read_landmarks(tmp_path / f"p{suffix}")
    np.testing.assert_allclose(back.error_bound_mm, [1.25, np.nan])


def test_slicer_files_describe_the_bound(tmp_path: Path) -> None:
    landmarks = LandmarkSet(["a"], np.array([[1.0, 2.0, 3.0]]), error_bound_mm=np.array([2.5]))
    write_landmarks(tmp_path / "p.mrk.json", landmarks)
    point = json.loads((tmp_path / "p.mrk.json").read_text())["markups"][0]["controlPoints"][0]
    assert point["description"] == "error bound 2.50 mm"
    write_landmarks(tmp_path / "p.fcsv", landmarks)
    assert "error bound 2.50 mm" in (tmp_path / "p.fcsv").read_text()


def test_evaluate_measures_how_often_the_bounds_held(tmp_path: Path) -> None:
    truth, pred = tmp_path / "gt", tmp_path / "pred"
    for i in range(4):
        points = np.array([[10.0, 10.0], [20.0, 20.0]])
        write_landmarks(truth / f"c{i}.json", LandmarkSet(["a", "b"], points))
        moved = points + np.array([[i, 0.0], [0.5, 0.0]])  # a: errors 0, 1, 2, 3 mm; b: 0.5 mm
        bounds = np.array([1.5, 1.0])
        write_landmarks(pred / f"c{i}.json", LandmarkSet(["a", "b"], moved, error_bound_mm=bounds))
    result = evaluate(pred, truth, tmp_path / "eval")["error_bound"]
    assert result["coverage_percent"] == pytest.approx(75.0)  # 2 of 4 for a, 4 of 4 for b
    assert result["per_landmark_coverage_percent"] == {"a": 50.0, "b": 100.0}
    assert "## Error bounds" in (tmp_path / "eval" / "report.md").read_text()
    assert "<h2>Error bounds</h2>" in (tmp_path / "eval" / "report.html").read_text()


def test_evaluate_without_bounds_says_nothing_of_them(tmp_path: Path) -> None:
    write_landmarks(tmp_path / "gt" / "c.json", LandmarkSet(["a"], np.array([[1.0, 1.0]])))
    write_landmarks(tmp_path / "pred" / "c.json", LandmarkSet(["a"], np.array([[1.0, 2.0]])))
    assert "error_bound" not in evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "eval")


def test_overlays_draw_the_bound_as_an_ellipse_in_pixels() -> None:
    from matplotlib.patches import Ellipse

    geometry = Geometry.identity((40, 60), (0.5, 0.25))
    image = ImageData(np.zeros((1, 40, 60), np.float32), geometry)
    landmarks = LandmarkSet(["a"], np.array([[5.0, 5.0]]), error_bound_mm=np.array([2.0]))
    figure = figure_2d(image, landmarks)
    (ellipse,) = [p for p in figure.axes[0].patches if isinstance(p, Ellipse)]
    assert (ellipse.width, ellipse.height) == (16.0, 8.0)  # 4 mm across: 16 columns, 8 rows
