"""A verdict per case (issue 17, item 1): evidence from the prediction, thresholds calibrated on
validation cases, the verdict in every landmark format, summary.csv, predict's output and the
evaluation's separation of good from bad cases."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medlandmark.evaluation import evaluate
from medlandmark.io.geometry import Geometry
from medlandmark.io.landmark_formats import CaseVerdict
from medlandmark.io.landmarks import LandmarkSet, read_landmarks, write_landmarks
from medlandmark.shape_model import apply_affine, fit_shape_model
from medlandmark.verdict import (
    case_evidence,
    combined_thresholds,
    judge,
    verdict_thresholds,
)

GEOMETRY = Geometry((1.0, 1.0), (-100.0, -100.0), ((1.0, 0.0), (0.0, 1.0)), (200, 200))
NAMES = [f"L{k}" for k in range(10)]


def _shapes(seed: int = 0, cases: int = 20) -> tuple[np.ndarray, list[np.ndarray]]:
    """A 2D constellation of 10 landmarks under rotations, scales and shifts, with 0.5 mm noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-50, 50, (10, 2))
    shapes = []
    for _ in range(cases):
        angle = rng.uniform(-0.2, 0.2)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        matrix = np.vstack([(rotation * rng.uniform(0.9, 1.1)).T, rng.uniform(-5, 5, 2)])
        shapes.append(apply_affine(matrix, base) + rng.normal(0, 0.5, base.shape))
    return base, shapes


@pytest.fixture(scope="module")
def calibrated():
    """A shape model of training shapes, and thresholds from validation cases found well."""
    _, shapes = _shapes()
    model = fit_shape_model(shapes[:14])
    rng = np.random.default_rng(1)
    evidence = [
        case_evidence(rng.uniform(0.8, 0.95, 10), np.ones(10, bool), s, model, GEOMETRY)
        for s in shapes[14:]
    ]
    return model, verdict_thresholds(evidence), shapes


def test_thresholds_come_from_the_validation_distribution(calibrated) -> None:
    model, thresholds, _ = calibrated
    assert model.handedness == 1  # every training case has the same handedness
    assert thresholds.cases == 6
    assert 0.85 < thresholds.confidence_typical < 0.9
    assert thresholds.confidence_failed < thresholds.confidence_doubtful < 0.81
    assert 0 < thresholds.shape_rms_typical_mm < thresholds.shape_rms_doubtful_mm < 2.0
    assert thresholds.missing_share_doubtful == pytest.approx(0.1)  # none missing, + 0.1
    assert thresholds.missing_share_failed == pytest.approx(0.5)
    both = combined_thresholds([thresholds, thresholds.model_copy(update={"cases": 4})])
    assert both.cases == 10 and both.confidence_doubtful == thresholds.confidence_doubtful
    assert combined_thresholds([]) is None


def test_a_well_found_case_is_ok(calibrated) -> None:
    model, thresholds, shapes = calibrated
    evidence = case_evidence(np.full(10, 0.88), np.ones(10, bool), shapes[-1], model, GEOMETRY)
    verdict = judge(evidence, thresholds, NAMES)
    assert verdict == CaseVerdict("ok", ())


def test_a_mirrored_constellation_fails_and_says_so(calibrated) -> None:
    model, thresholds, shapes = calibrated
    mirrored = shapes[-1] * np.array([-1.0, 1.0])  # the head facing the other way
    evidence = case_evidence(np.full(10, 0.88), np.ones(10, bool), mirrored, model, GEOMETRY)
    assert evidence.mirrored
    verdict = judge(evidence, thresholds, NAMES)
    assert verdict.status == "failed" and "mirror image" in verdict.reasons[0]
    assert judge(evidence, None, NAMES).status == "failed"  # needs no calibration


def test_low_confidence_is_doubtful_then_failed(calibrated) -> None:
    model, thresholds, shapes = calibrated
    low = (thresholds.confidence_doubtful + thresholds.confidence_failed) / 2
    for value, status in [(low, "doubtful"), (thresholds.confidence_failed - 0.05, "failed")]:
        evidence = case_evidence(np.full(10, value), np.ones(10, bool), shapes[-1], model, GEOMETRY)
        verdict = judge(evidence, thresholds, NAMES)
        assert verdict.status == status and "mean confidence" in verdict.reasons[0]
    assert judge(evidence, None, NAMES).status == "ok"  # uncalibrated: no confidence rule


def test_points_lost_or_off_the_shape_or_outside_are_doubtful(calibrated) -> None:
    model, thresholds, shapes = calibrated
    present = np.ones(10, bool)
    present[[2, 5]] = False  # 20 % of the landmarks in view reported missing
    evidence = case_evidence(np.full(10, 0.88), present, shapes[-1], model, GEOMETRY)
    verdict = judge(evidence, thresholds, NAMES)
    assert verdict.status == "doubtful" and "20% of the landmarks in view" in verdict.reasons[0]
    moved = shapes[-1].copy()
    moved[[3, 7]] += 25.0  # two points on look-alikes
    evidence = case_evidence(np.full(10, 0.88), np.ones(10, bool), moved, model, GEOMETRY)
    assert evidence.disagreeing == (3, 7)
    assert any(
        "off the training shape: L3, L7" in r for r in judge(evidence, thresholds, NAMES).reasons
    )
    small = Geometry((1.0, 1.0), (-40.0, -40.0), ((1.0, 0.0), (0.0, 1.0)), (200, 200))
    evidence = case_evidence(np.full(10, 0.88), np.ones(10, bool), shapes[-1], model, small)
    assert not evidence.outside  # cut off by the field of view: reported missing, not outside
    evidence = case_evidence(np.full(10, 0.88), np.ones(10, bool), shapes[-1], None, small)
    assert evidence.outside  # without a shape model nothing explains points off the image
    assert any(r.startswith("outside the image:") for r in judge(evidence, None, NAMES).reasons)


def test_nothing_found_or_no_plausible_shape_fails(calibrated) -> None:
    model, thresholds, shapes = calibrated
    nothing = case_evidence(np.full(10, 0.05), np.zeros(10, bool), shapes[-1], model, GEOMETRY)
    assert judge(nothing, thresholds, NAMES).reasons[0] == "no landmark found"
    scattered = np.random.default_rng(3).uniform(-90, 90, (10, 2))
    evidence = case_evidence(np.full(10, 0.88), np.ones(10, bool), scattered, model, GEOMETRY)
    verdict = judge(evidence, thresholds, NAMES)
    assert verdict.status == "failed" and "fit no plausible shape" in verdict.reasons[0]


@pytest.mark.parametrize("suffix", [".json", ".csv", ".mrk.json", ".fcsv"])
def test_the_verdict_round_trips_through_every_landmark_format(tmp_path: Path, suffix) -> None:
    verdict = CaseVerdict(
        "doubtful", ("mean confidence 0.41 (typical 0.88)", "outside the image: a")
    )
    landmarks = LandmarkSet(
        ["a", "b"], np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), verdict=verdict
    )
    write_landmarks(tmp_path / f"p{suffix}", landmarks)
    assert read_landmarks(tmp_path / f"p{suffix}").verdict == verdict
    write_landmarks(tmp_path / f"q{suffix}", LandmarkSet(["a"], np.array([[1.0, 2.0, 3.0]])))
    assert read_landmarks(tmp_path / f"q{suffix}").verdict is None


def test_slicer_keeps_the_verdict_as_the_markup_description_and_attributes(tmp_path: Path) -> None:
    verdict = CaseVerdict("failed", ("no landmark found",))
    write_landmarks(
        tmp_path / "p.mrk.json", LandmarkSet(["a"], np.full((1, 3), np.nan), verdict=verdict)
    )
    markup = json.loads((tmp_path / "p.mrk.json").read_text())["markups"][0]
    assert markup["description"] == "case failed: no landmark found"
    assert markup["attributes"]["medlandmark.case_status"] == "failed"


def test_an_unknown_status_in_a_file_is_named(tmp_path: Path) -> None:
    from medlandmark.errors import LandmarkFileError

    path = tmp_path / "p.csv"
    path.write_text("# coordinate_space: LPS\n# case_status: great\nname,x,y\na,1,2\n")
    with pytest.raises(LandmarkFileError, match="case status must be one of ok, doubtful, failed"):
        read_landmarks(path)


def test_evaluate_reports_the_ok_cases_and_how_well_flags_separate(tmp_path: Path) -> None:
    truth, pred = tmp_path / "gt", tmp_path / "pred"
    names = ["a", "b"]
    cases = [  # (error in mm, verdict)
        (0.5, "ok"),
        (1.0, "ok"),
        (20.0, "failed"),  # bad and flagged
        (0.8, "doubtful"),  # good but flagged
        (9.0, "ok"),  # bad and missed
    ]
    for i, (error, status) in enumerate(cases):
        points = np.array([[10.0, 10.0], [30.0, 20.0]])
        write_landmarks(truth / f"c{i}.json", LandmarkSet(names, points))
        reasons = () if status == "ok" else (f"reason {i}",)
        verdict = CaseVerdict(status, reasons)
        write_landmarks(
            pred / f"c{i}.json", LandmarkSet(names, points + [error, 0.0], verdict=verdict)
        )
    metrics = evaluate(pred, truth, tmp_path / "eval")
    result = metrics["verdict"]
    assert result["counts"] == {"ok": 3, "doubtful": 1, "failed": 1}
    assert result["ok_cases"]["n_cases"] == 3
    assert result["ok_cases"]["mre_mm"] == pytest.approx((0.5 + 1.0 + 9.0) / 3)
    assert result["bad_cases"] == 2 and result["bad_flagged_percent"] == pytest.approx(50.0)
    assert result["flagged_cases"] == 2 and result["flagged_good_percent"] == pytest.approx(50.0)
    assert [row["case_id"] for row in result["flagged"]] == ["c2", "c3"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Case verdicts" in report and "reason 2" in report
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "<h2>Case verdicts</h2>" in html and "reason 3" in html


def test_training_calibrates_the_checks_and_predict_writes_verdicts(tmp_path: Path, capfd) -> None:
    """A real (briefly trained) run with a validation fold: run.json holds the thresholds, every
    landmark file and summary.csv a verdict, and predict prints the doubtful and failed ones."""
    from medlandmark import console
    from medlandmark.inference.batch import PredictOptions, predict_files
    from medlandmark.records.run import read_run_record
    from medlandmark.training.loop import TrainOptions, train

    from .conftest import synthetic_training_set

    console.configure(quiet=False)
    dataset = synthetic_training_set(tmp_path / "ds", num_cases=8, size_px=48)
    train(dataset, tmp_path / "run", TrainOptions(epochs=1, iterations_per_epoch=3, fold=0))
    record = read_run_record(tmp_path / "run")
    thresholds = record.verdict_thresholds
    assert thresholds is not None and thresholds.cases == len(record.val_cases)
    assert 0 < record.relative_presence_threshold < 2
    assert record.shape_model is not None and record.shape_model.handedness == 1
    images = sorted((dataset / "images").iterdir())[:3]
    rows = predict_files(tmp_path / "run", images, tmp_path / "out", PredictOptions("csv"))
    summary = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert [r["verdict"] for r in summary] == [r["verdict"] for r in rows]
    for row in rows:
        assert row["verdict"] in ("ok", "doubtful", "failed")
        verdict = read_landmarks(tmp_path / "out" / row["landmark_file"], ndim=2).verdict
        assert (
            verdict.status == row["verdict"]
            and "; ".join(verdict.reasons) == row["verdict_reasons"]
        )
    printed = capfd.readouterr().err
    for row in rows:
        if row["verdict"] != "ok":
            assert f"{row['case_id']}: {row['verdict']}" in printed


def test_calibrate_restores_the_limits_of_a_run_trained_before_them(tmp_path: Path) -> None:
    from medlandmark.cli import main
    from medlandmark.records.run import read_run_record, write_run_record
    from medlandmark.training.loop import TrainOptions, train

    from .conftest import synthetic_training_set

    dataset = synthetic_training_set(tmp_path / "ds", num_cases=8, size_px=48)
    train(dataset, tmp_path / "run", TrainOptions(epochs=1, iterations_per_epoch=2, fold=0))
    trained = read_run_record(tmp_path / "run")
    older = trained.model_copy(update={"verdict_thresholds": None, "presence_threshold": None})
    write_run_record(tmp_path / "run", older)
    assert main(["calibrate", str(tmp_path / "run"), "--device", "cpu"]) == 0
    again = read_run_record(tmp_path / "run")
    before, after = trained.verdict_thresholds.model_dump(), again.verdict_thresholds.model_dump()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key] == (value if value is None else pytest.approx(value, rel=1e-4)), key
    assert again.presence_threshold == pytest.approx(trained.presence_threshold, rel=1e-4)
    train(dataset, tmp_path / "all", TrainOptions(epochs=1, iterations_per_epoch=1, fold="all"))
    assert main(["calibrate", str(tmp_path / "all")]) == 2  # no validation cases: named


def test_relative_presence_ignores_a_contrast_that_lowers_every_peak() -> None:
    from medlandmark.heatmaps import relative_confidences
    from medlandmark.inference.predictor import Stage

    confidence = np.array([0.9, 0.85, 0.8, 0.88, 0.1, 0.05])  # two landmarks absent
    dimmed = 0.3 * confidence  # the same case under another contrast
    np.testing.assert_allclose(relative_confidences(dimmed), relative_confidences(confidence))
    np.testing.assert_allclose(relative_confidences(confidence)[:4].mean(), 1.0, atol=0.05)
    stage = Stage(None, None, [], 0.25, [], None, relative_presence_threshold=0.5)
    assert stage.present(confidence, "absolute").tolist() == [True] * 4 + [False] * 2
    assert stage.present(dimmed, "absolute").tolist() == [True, True, False, True, False, False]
    assert stage.present(dimmed, "relative").tolist() == [True] * 4 + [False] * 2
    assert stage.present(0.1 * confidence, "shape").tolist() == [True] * 4 + [False] * 2
    older = Stage(None, None, [], 0.25, [], None)  # a run without the relative threshold
    assert older.present(dimmed, "relative").tolist() == older.present(dimmed, "absolute").tolist()


def test_the_default_presence_rule_is_shape_in_3d_and_absolute_in_2d() -> None:
    from medlandmark.errors import MedlandmarkError
    from medlandmark.inference.predictor import Predictor, Stage, presence_rule

    assert presence_rule("auto", 3) == "shape" and presence_rule("auto", 2) == "absolute"
    assert presence_rule("relative", 3) == "relative"
    with pytest.raises(MedlandmarkError, match="presence must be one of auto, absolute"):
        Predictor([Stage(None, None, [], 0.25, [], None)], ["a"], "cpu", presence="strict")


def test_without_a_plausible_fit_the_shape_rule_lets_the_peaks_decide() -> None:
    from types import SimpleNamespace

    from medlandmark.inference.predictor import Predictor, Stage
    from medlandmark.io.geometry import Geometry
    from medlandmark.shape_model import ExpectedFit, ShapeModel

    reference = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10], [10, 10, 10]])
    model = ShapeModel(reference, 2.0, (0.8, 1.2), handedness=1, rotation_limit_deg=30.0)
    sizes = SimpleNamespace(batch_size=1)  # all the predictor reads of the configuration here
    stage = Stage(sizes, None, [], 0.5, [], None, shape_model=model)
    predictor = Predictor([stage], list("abcde"), "cpu", presence="shape")
    geometry = Geometry.identity((12, 12, 12))
    peak = np.array([0.9, 0.8, 0.3, 0.7, 0.2])
    expected = reference.copy()
    expected[4] = [30.0, 30.0, 30.0]  # beyond the field of view
    kept = ExpectedFit(expected, np.arange(4), 0.5, handedness=1, rotation_deg=5.0)
    mirrored = ExpectedFit(expected, np.arange(4), 0.5, handedness=-1, rotation_deg=5.0)
    turned = ExpectedFit(expected, np.arange(4), 0.5, handedness=1, rotation_deg=90.0)
    assert predictor._missing_by_shape(kept, peak, geometry).tolist() == [False] * 4 + [True]
    by_peaks = [False, False, True, False, True]
    for fit in (None, mirrored, turned):
        assert predictor._missing_by_shape(fit, peak, geometry).tolist() == by_peaks
    absolute = Predictor([stage], list("abcde"), "cpu", presence="absolute")
    assert absolute._missing_by_shape(None, peak, geometry).tolist() == [False] * 5
