"""Evaluation: metrics on hand-made arrays, then `evaluate` end to end through files and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from medlandmark.cli import main
from medlandmark.datasets.dataset import DatasetSpec, write_spec
from medlandmark.errors import DatasetError, LandmarkFileError
from medlandmark.evaluation import evaluate
from medlandmark.io.geometry import Geometry
from medlandmark.io.images import write_image
from medlandmark.io.landmarks import LandmarkSet, read_landmarks, write_landmarks
from medlandmark.metrics import (
    error_statistics,
    missing_confusion,
    radial_errors_mm,
    success_detection_rates,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = math.nan

# --- metrics on arrays -----------------------------------------------------------------------


def test_radial_errors_are_euclidean_3_4_5_triangles():
    pred = np.array([[[3.0, 4.0], [10.0, 10.0]], [[-6.0, 8.0], [1.0, 1.0]]])
    gt = np.array([[[0.0, 0.0], [10.0, 10.0]], [[0.0, 0.0], [1.0, 1.0]]])
    np.testing.assert_allclose(radial_errors_mm(pred, gt), [[5.0, 0.0], [10.0, 0.0]])


def test_radial_errors_in_3d():
    gt = np.zeros((1, 2, 3))
    pred = np.array([[[1.0, 2.0, 2.0], [2.0, -3.0, 6.0]]])
    np.testing.assert_allclose(radial_errors_mm(pred, gt), [[3.0, 7.0]])


def test_a_point_missing_on_either_side_is_not_evaluated():
    pred = np.array([[[3.0, 4.0], [NAN, NAN], [0.0, 0.0], [NAN, NAN]]])
    gt = np.array([[[0.0, 0.0], [0.0, 0.0], [NAN, NAN], [NAN, NAN]]])
    errors = radial_errors_mm(pred, gt)
    assert errors[0, 0] == 5.0
    assert np.isnan(errors[0, 1:]).all()
    stats = error_statistics(errors)
    assert stats["n"] == 1 and stats["mre_mm"] == 5.0
    np.testing.assert_allclose(success_detection_rates(errors, [4.9, 5.0]), [0.0, 100.0])


def test_sd_is_the_population_sd_and_median_is_over_points():
    stats = error_statistics(np.array([[3.0, 5.0], [NAN, 10.0]]))
    assert stats["n"] == 3
    assert stats["mre_mm"] == pytest.approx(6.0)
    assert stats["sd_mm"] == pytest.approx(np.sqrt((9 + 1 + 16) / 3))  # ddof=0, not ddof=1
    assert stats["median_mm"] == 5.0
    assert stats["max_mm"] == 10.0


def test_statistics_of_no_points_are_none():
    stats = error_statistics(np.array([NAN, NAN]))
    assert stats == {"n": 0, "mre_mm": None, "sd_mm": None, "median_mm": None, "max_mm": None}
    assert np.isnan(success_detection_rates(np.array([NAN]), [2.0])).all()


def test_sdr_counts_an_error_equal_to_the_radius_as_within():
    errors = np.array([1.0, 2.0, 2.001, 3.0, NAN])
    np.testing.assert_allclose(
        success_detection_rates(errors, [1.0, 2.0, 2.5, 3.0]), [25, 50, 75, 100]
    )


def test_sdr_boundary_survives_float_rounding_of_world_coordinates():
    # 12 and 16 pixels of 0.1 mm: exactly 2 mm, but 2.0000000000000084 in floating point
    pred, gt = np.array([[0.1 * 846, 0.1 * 1022]]), np.array([[0.1 * 834, 0.1 * 1038]])
    errors = radial_errors_mm(pred, gt)
    assert errors[0] > 2.0
    assert success_detection_rates(errors, [2.0])[0] == 100.0


@given(
    st.lists(st.floats(0, 50, allow_nan=False) | st.just(NAN), min_size=1, max_size=40),
    st.floats(0.1, 40),
)
def test_sdr_is_the_percent_of_evaluated_points_within_r(values, radius):
    errors = np.array(values)
    finite = errors[~np.isnan(errors)]
    rate = success_detection_rates(errors, [radius])[0]
    if finite.size == 0:
        assert np.isnan(rate)
    else:
        expected = 100.0 * sum(e <= radius + 1e-6 for e in finite) / finite.size
        assert rate == pytest.approx(expected)


def test_missing_confusion_counts_all_four_kinds():
    pred_present = np.array([[False, False, True, True, False, True]])
    gt_present = np.array([[False, True, False, True, True, True]])
    assert missing_confusion(pred_present, gt_present) == {"tp": 1, "fp": 2, "fn": 1, "tn": 2}


def test_summarize_per_landmark_per_case_and_worst_cases():
    errors = np.array([[1.0, 3.0], [5.0, NAN], [2.0, 2.0]])
    present = ~np.isnan(errors)
    metrics = summarize(
        errors, present, np.ones_like(present), ["a", "b", "c"], ["P", "Q"], [2.0, 4.0]
    )
    assert metrics["n_cases"] == 3 and metrics["n_points"] == 5
    assert metrics["mre_mm"] == pytest.approx(13 / 5)
    assert metrics["sdr"] == {"2.0": pytest.approx(60.0), "4.0": pytest.approx(80.0)}
    assert metrics["per_landmark"]["P"]["mre_mm"] == pytest.approx(8 / 3)
    assert metrics["per_landmark"]["Q"]["n"] == 2
    assert metrics["per_landmark"]["Q"]["sdr"]["2.0"] == pytest.approx(50.0)
    assert metrics["per_landmark"]["Q"]["missing"] == {"tp": 0, "fp": 1, "fn": 0, "tn": 2}
    assert metrics["per_case_mre_mm"] == {"a": 2.0, "b": 5.0, "c": 2.0}
    assert [row["case_id"] for row in metrics["worst_cases"]] == ["b", "a", "c"]
    assert metrics["worst_cases"][1]["worst_landmark"] == "Q"
    assert metrics["missing"] == {"tp": 0, "fp": 1, "fn": 0, "tn": 5}


# --- end to end through files ----------------------------------------------------------------

NAMES = ["sella", "nasion", "menton"]
GEOMETRY_2D = Geometry.identity((20, 30), (0.5, 0.5))


def make_dataset_2d(root: Path, gt_points: dict[str, np.ndarray]) -> Path:
    """A tiny 2D dataset: one 20x30 image and one landmark .csv per case."""
    write_spec(root, DatasetSpec(name="tiny", spatial_dims=2, landmarks=NAMES, modalities=["xray"]))
    for case_id, points in gt_points.items():
        write_image(root / "images" / f"{case_id}.mha", np.zeros((20, 30), np.uint8), GEOMETRY_2D)
        write_landmarks(root / "landmarks" / f"{case_id}.csv", LandmarkSet(NAMES, points))
    return root


GT_2D = {
    "c1": np.array([[1.0, 1.0], [5.0, 5.0], [10.0, 8.0]]),
    "c2": np.array([[2.0, 2.0], [NAN, NAN], [8.0, 6.0]]),
    "c3": np.array([[3.0, 3.0], [4.0, 4.0], [5.0, 5.0]]),
}


def write_predictions_2d(pred_dir: Path) -> None:
    """c1 (.json): errors 5 (3-4-5), 0, missing; c2 (.mrk.json, names reversed): 0, missing
    both sides, error 2; c3 has no prediction."""
    c1 = np.array([[4.0, 5.0], [5.0, 5.0], [NAN, NAN]])
    write_landmarks(pred_dir / "c1.json", LandmarkSet(NAMES, c1))
    c2 = np.array([[2.0, 2.0], [NAN, NAN], [8.0, 8.0]])
    write_landmarks(pred_dir / "c2.mrk.json", LandmarkSet(NAMES[::-1], c2[::-1]))


def check_metrics_2d(metrics: dict) -> None:
    assert metrics["n_cases"] == 2
    assert metrics["n_points"] == 4
    assert metrics["n_gt_cases_without_prediction"] == 1
    assert metrics["ndim"] == 2 and metrics["units"] == "mm"
    assert metrics["mre_mm"] == pytest.approx(7 / 4)
    assert metrics["sd_mm"] == pytest.approx(np.std([5.0, 0.0, 0.0, 2.0]))
    assert metrics["median_mm"] == pytest.approx(1.0)
    assert metrics["sdr"] == {"2.0": 75.0, "2.5": 75.0, "3.0": 75.0, "4.0": 75.0}
    assert metrics["radii_mm"] == [2.0, 2.5, 3.0, 4.0]
    assert metrics["missing"] == {"tp": 1, "fp": 1, "fn": 0, "tn": 4}
    assert list(metrics["per_landmark"]) == NAMES
    assert metrics["per_landmark"]["sella"]["mre_mm"] == pytest.approx(2.5)
    assert metrics["per_landmark"]["sella"]["sdr"]["2.0"] == pytest.approx(50.0)
    assert metrics["per_landmark"]["menton"]["n"] == 1
    assert metrics["per_landmark"]["menton"]["mre_mm"] == pytest.approx(2.0)
    assert metrics["per_case_mre_mm"] == {"c1": 2.5, "c2": 1.0}
    assert metrics["worst_cases"][0]["case_id"] == "c1"
    assert {"sd_convention", "sdr_rule"} <= set(metrics)


def check_outputs(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    for heading in (
        "## Summary",
        "## Success detection rate",
        "## Per landmark",
        "## Missing landmarks",
        "## Worst cases",
    ):
        assert heading in report
    for plot in metrics["files"]["plots"]:
        assert (out / plot).read_bytes()[:8] == PNG_MAGIC
        assert f"]({plot})" in report
    assert len(metrics["files"]["plots"]) == 2
    assert not list(out.glob(".*partial*"))
    return metrics


def test_evaluate_against_a_dataset_matches_by_name(tmp_path):
    gt = make_dataset_2d(tmp_path / "gt", GT_2D)
    write_predictions_2d(tmp_path / "pred")
    returned = evaluate(tmp_path / "pred", gt, tmp_path / "out")
    written = check_outputs(tmp_path / "out")
    check_metrics_2d(written)
    assert returned == written
    rows = (tmp_path / "out" / "radial_errors.csv").read_text().splitlines()
    assert rows[0] == "case_id,landmark,radial_error_mm,pred_present,gt_present"
    assert "c1,sella,5.000000,1,1" in rows and "c2,nasion,,0,0" in rows


def _evaluate_command(tmp_path, gt) -> list[str]:
    return [
        "evaluate",
        "--pred",
        str(tmp_path / "pred"),
        "--gt",
        str(gt),
        "--out",
        str(tmp_path / "out"),
    ]


def test_cli_evaluate_writes_the_same_metrics(tmp_path):
    gt = make_dataset_2d(tmp_path / "gt", GT_2D)
    write_predictions_2d(tmp_path / "pred")
    args = _evaluate_command(tmp_path, gt)
    assert main(args) == 0
    check_metrics_2d(check_outputs(tmp_path / "out"))
    assert main([*args, "--radii", "1,5"]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["sdr"] == {
        "1.0": 50.0,
        "5.0": 100.0,
    }


def test_prediction_without_ground_truth_is_an_error_naming_the_file(tmp_path, capsys):
    gt = make_dataset_2d(tmp_path / "gt", GT_2D)
    write_predictions_2d(tmp_path / "pred")
    stray = tmp_path / "pred" / "c9.csv"
    write_landmarks(stray, LandmarkSet(NAMES, GT_2D["c1"]))
    with pytest.raises(DatasetError) as error:
        evaluate(tmp_path / "pred", gt, tmp_path / "out")
    assert error.value.path == stray
    code = main(_evaluate_command(tmp_path, gt))
    assert code == 2
    assert "c9.csv" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_empty_prediction_folder_is_an_error_naming_it(tmp_path):
    gt = make_dataset_2d(tmp_path / "gt", GT_2D)
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "notes.md").write_text("not a landmark file")
    with pytest.raises(DatasetError, match="no prediction files") as error:
        evaluate(tmp_path / "pred", gt, tmp_path / "out")
    assert error.value.path == tmp_path / "pred"


def test_landmark_names_that_do_not_match_are_an_error_naming_the_file(tmp_path):
    gt = make_dataset_2d(tmp_path / "gt", GT_2D)
    wrong = tmp_path / "pred" / "c1.csv"
    write_landmarks(wrong, LandmarkSet(["sella", "nasion", "gnathion"], GT_2D["c1"]))
    with pytest.raises(LandmarkFileError, match="gnathion") as error:
        evaluate(tmp_path / "pred", gt, tmp_path / "out")
    assert error.value.path == wrong


def test_ground_truth_as_a_plain_folder_in_3d(tmp_path):
    names = ["AC", "PC", "genu"]
    gt = {
        "s1": np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]]),
        "s2": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]),
    }
    for case_id, points in gt.items():
        write_landmarks(
            tmp_path / "gt" / f"{case_id}.fcsv", LandmarkSet(names, points), space="RAS"
        )
    offsets = np.array([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [2.0, 3.0, 6.0]])
    write_landmarks(tmp_path / "pred" / "s1.mrk.json", LandmarkSet(names, gt["s1"] + offsets))
    write_landmarks(tmp_path / "pred" / "s2.csv", LandmarkSet(names[::-1], gt["s2"][::-1]))
    metrics = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert metrics["ndim"] == 3
    assert metrics["n_points"] == 6
    assert metrics["mre_mm"] == pytest.approx(10 / 6)
    assert metrics["per_case_mre_mm"] == {"s1": pytest.approx(10 / 3), "s2": 0.0}
    assert metrics["per_landmark"]["genu"]["mre_mm"] == pytest.approx(3.5)
    check_outputs(tmp_path / "out")


def test_plain_folder_2d_predictions_against_slicer_ground_truth(tmp_path):
    points = np.array([[1.0, 2.0], [3.0, 4.0]])
    write_landmarks(tmp_path / "gt" / "a.mrk.json", LandmarkSet(["p", "q"], points))
    write_landmarks(
        tmp_path / "pred" / "a.csv", LandmarkSet(["p", "q"], points + [[3.0, 4.0], [0.0, 0.0]])
    )
    metrics = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert metrics["ndim"] == 2 and metrics["mre_mm"] == pytest.approx(2.5)


# --- real data -------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_isbi2015_junior_against_senior_on_test1(shared_data, tmp_path):
    """The inter-observer reference: about 2.36 mm and 55.5 % within 2 mm on Test1."""
    annotations = shared_data / "isbi2015" / "AnnotationsByMD"
    if not annotations.is_dir():
        pytest.skip("../shared/data/isbi2015/AnnotationsByMD not found: real-data test skipped")
    geometry = Geometry.identity((2400, 1935), (0.1, 0.1))
    raw_errors = []
    for number in range(151, 301):
        for annotator, folder in (("400_senior", "gt"), ("400_junior", "pred")):
            points = read_landmarks(
                annotations / annotator / f"{number:03d}.txt", geometry=geometry
            )
            write_landmarks(tmp_path / folder / f"{number:03d}.csv", points)
        senior, junior = (
            np.loadtxt(annotations / a / f"{number:03d}.txt", delimiter=",", max_rows=19)
            for a in ("400_senior", "400_junior")
        )
        raw_errors.append(0.1 * np.hypot(*(senior - junior).T))  # integer pixels: exact at 2 mm
    raw_errors = np.concatenate(raw_errors)
    metrics = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert metrics["n_cases"] == 150 and metrics["n_points"] == 2850
    assert metrics["mre_mm"] == pytest.approx(2.36, abs=0.01)
    assert metrics["mre_mm"] == pytest.approx(raw_errors.mean(), abs=1e-6)
    assert metrics["sdr"]["2.0"] == pytest.approx(100 * np.mean(raw_errors <= 2.0), abs=1e-6)
    assert round(metrics["sdr"]["2.0"], 1) == 55.5  # 1583 of 2850 points = 55.544 %
