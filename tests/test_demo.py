"""`medlandmark demo`: every step runs for real, and the default recipe reaches a clearly good
result on the synthetic hands (well under the landmarks' spacing)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medlandmark import demo
from medlandmark.cli import main
from medlandmark.datasets.synthetic import synthetic_volume_case
from medlandmark.io.images import read_image
from medlandmark.io.landmarks import read_landmarks

from .conftest import shared_path


def _smallest_landmark_distance_mm(points_mm: np.ndarray) -> float:
    distances = np.linalg.norm(points_mm[:, None] - points_mm[None], axis=-1)
    return float(distances[~np.eye(len(points_mm), dtype=bool)].min())


def test_default_demo_trains_predicts_and_reports_a_good_result(tmp_path, capsys):
    """The recipe `make demo` runs: all seven steps, then the table and report.html's path."""
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 0
    out = tmp_path / "demo"
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    truth = read_landmarks(next((out / "dataset" / "landmarks").iterdir()))
    spacing_mm = _smallest_landmark_distance_mm(truth.points_mm)
    assert metrics["n_cases"] == 10 and metrics["n_points"] == 90
    assert metrics["mre_mm"] < 1.5 < spacing_mm / 3, (metrics["mre_mm"], spacing_mm)
    assert metrics["sdr"]["2.0"] > 90.0
    printed = capsys.readouterr().err
    assert "[7/7] evaluate" in printed and "MRE" in printed
    assert str(out / "evaluation" / "report.html") in printed.replace("\n", "")
    assert (out / "evaluation" / "report.html").is_file()
    assert (out / "run" / "model_best.safetensors").is_file()


@pytest.fixture
def short_recipes(monkeypatch):
    """Every demo recipe cut to a few steps: the pipeline, not the accuracy, is under test."""
    short = {k: replace(r, epochs=2, iterations_per_epoch=3) for k, r in demo.RECIPES.items()}
    monkeypatch.setattr(demo, "RECIPES", short)


def test_3d_demo_runs_every_step_on_volumes(tmp_path, short_recipes):
    assert main(["demo", "-o", str(tmp_path / "demo3d"), "--3d"]) == 0
    out = tmp_path / "demo3d"
    image = read_image(next((out / "dataset" / "images").iterdir()))
    assert image.geometry.ndim == 3
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["n_cases"] == 8 and metrics["n_points"] == 8 * 7
    overlays = list((out / "evaluation" / "worst_cases").glob("*.png"))
    assert overlays, "the 3D report shows orthogonal slices of the worst cases"


def test_synthetic_volume_landmarks_sit_on_their_features():
    """The organ centre is the brightest structure; limb tips sit on the body's surface."""
    volume, landmarks_xyz = synthetic_volume_case(seed=7, size_vox=32)
    x, y, z = np.round(landmarks_xyz[4]).astype(int)
    assert volume[z, y, x] > np.percentile(volume, 97)
    for tip in landmarks_xyz[:4]:
        x, y, z = np.round(tip).astype(int)
        assert min(x, y, z) >= 0 and max(x, y, z) < 32
        assert np.percentile(volume, 20) < volume[z, y, x] < volume.max()


def _isbi_source_subset(folder: Path, train: range, test1: range) -> Path:
    """The official ISBI 2015 layout holding a few real images (symlinks)."""
    source = shared_path("isbi2015")
    for split, cases in (("TrainingData", train), ("Test1Data", test1)):
        (folder / "RawImage" / split).mkdir(parents=True)
        for number in cases:
            name = f"{number:03d}.jpg"
            os.symlink(source / "RawImage" / split / name, folder / "RawImage" / split / name)
    for annotator in ("400_senior", "400_junior"):
        (folder / "AnnotationsByMD" / annotator).mkdir(parents=True)
        for number in [*train, *test1]:
            name = f"{number:03d}.txt"
            os.symlink(
                source / "AnnotationsByMD" / annotator / name,
                folder / "AnnotationsByMD" / annotator / name,
            )
    return folder


def test_isbi2015_demo_runs_on_real_cephalograms(tmp_path, short_recipes):
    source = _isbi_source_subset(tmp_path / "isbi_source", range(1, 7), range(151, 153))
    assert main(["demo", "-o", str(tmp_path / "demo_isbi"), "--isbi2015", str(source)]) == 0
    metrics = json.loads((tmp_path / "demo_isbi" / "evaluation" / "metrics.json").read_text())
    assert metrics["n_cases"] == 2 and metrics["n_points"] == 2 * 19


def test_demo_options_are_exclusive_and_default_to_the_shared_data(capsys):
    from medlandmark.cli import DEFAULT_ISBI2015, build_parser

    args = build_parser().parse_args(["demo", "--isbi2015"])
    assert args.isbi2015 == DEFAULT_ISBI2015 and not args.three_d
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--3d", "--isbi2015"])
