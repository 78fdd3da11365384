"""``medlandmark check``: every problem of a dataset folder, each with its file, in one run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medlandmark.cli import main
from medlandmark.datasets.check import (
    CheckReport,
    check_dataset,
    distance_outside_mm,
    print_check_report,
)
from medlandmark.datasets.dataset import DatasetSpec, Problem, write_spec
from medlandmark.errors import DatasetError
from medlandmark.io.geometry import Geometry, index_to_world
from medlandmark.io.images import read_image, write_image
from medlandmark.io.landmarks import LandmarkSet, write_landmarks

NAMES = [f"L{k}" for k in range(1, 20)]
SHAPE = (24, 32)  # rows, columns
SPACING_MM = 0.5
GEOMETRY = Geometry.identity(SHAPE, (SPACING_MM, SPACING_MM))
# Clean cases: id -> (image suffix, landmark suffix, pixel type).
CASES = {
    "a": (".nii.gz", ".json", np.float32),
    "b": (".mha", ".csv", np.uint8),
    "c": (".png", ".txt", np.uint8),
}


def spec(**changes) -> DatasetSpec:
    fields = {
        "name": "tiny",
        "spatial_dims": 2,
        "landmarks": NAMES,
        "modalities": ["xray"],
        "spacing_mm": [SPACING_MM, SPACING_MM],
    }
    return DatasetSpec(**{**fields, **changes})


def image_array(dtype=np.uint8, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=shape).astype(dtype)


def landmark_set(seed: int = 0, names: list[str] = NAMES) -> LandmarkSet:
    """Landmarks at whole pixels inside the image (ISBI .txt stores integers exactly)."""
    rng = np.random.default_rng(seed)
    index = np.stack([rng.integers(0, n, len(names)) for n in SHAPE], axis=1)
    return LandmarkSet(list(names), index_to_world(index.astype(float), GEOMETRY))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A clean 2D dataset of three cases: NIfTI + JSON, MHA + CSV, PNG + ISBI txt."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "landmarks").mkdir()
    write_spec(root, spec())
    for seed, (case_id, (image_suffix, landmark_suffix, dtype)) in enumerate(CASES.items()):
        write_image(root / "images" / f"{case_id}{image_suffix}", image_array(dtype), GEOMETRY)
        landmarks_path = root / "landmarks" / f"{case_id}{landmark_suffix}"
        write_landmarks(landmarks_path, landmark_set(seed), GEOMETRY)
    return root


def problems_of(report: CheckReport, path: Path) -> list[Problem]:
    return [p for p in report.problems if Path(p.path) == path]


def only_error_on(report: CheckReport, path: Path, *words: str) -> Problem:
    """The report fails with exactly one error, on ``path``, whose message holds ``words``."""
    assert not report.ok
    assert [Path(p.path) for p in report.errors] == [path], report.problems
    message = report.errors[0].message
    for word in words:
        assert word.lower() in message.lower(), message
    return report.errors[0]


# --- a clean dataset ------------------------------------------------------------------------


def test_clean_dataset_passes_with_exit_code_0(dataset: Path, capsys) -> None:
    report = check_dataset(dataset)
    assert report.ok and report.problems == [] and report.num_cases == 3
    assert main(["check", str(dataset)]) == 0
    assert "checked 3 cases: 0 errors, 0 warnings" in capsys.readouterr().err


def test_missing_landmark_without_recorded_position_is_allowed(dataset: Path) -> None:
    landmarks = landmark_set(0)
    landmarks.points_mm[4] = np.nan
    write_landmarks(dataset / "landmarks" / "a.json", landmarks)
    report = check_dataset(dataset)
    assert report.ok and report.problems == []


def test_not_a_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        check_dataset(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        check_dataset(tmp_path / "file")
    assert main(["check", str(tmp_path / "nowhere")]) == 2


# --- dataset.json and the folder layout ----------------------------------------------------


def test_schema_error_is_one_problem_on_dataset_json_and_stops(dataset: Path) -> None:
    data = json.loads((dataset / "dataset.json").read_text())
    data["spatial_dims"] = 4
    (dataset / "dataset.json").write_text(json.dumps(data))
    (dataset / "images" / "a.nii.gz").write_bytes(b"")  # not reached: nothing can be interpreted
    report = check_dataset(dataset)
    problem = only_error_on(report, dataset / "dataset.json", "spatial_dims")
    assert len(report.problems) == 1 and "schema" in problem.message


def test_missing_dataset_json_is_a_problem(dataset: Path) -> None:
    (dataset / "dataset.json").unlink()
    report = check_dataset(dataset)
    assert not report.ok and "no dataset.json" in report.errors[0].message


def test_duplicate_case_ids(dataset: Path) -> None:
    write_image(dataset / "images" / "a.png", image_array(), GEOMETRY)
    report = check_dataset(dataset)
    only_error_on(report, dataset / "images" / "a.png", "duplicate case id 'a'", "a.nii.gz")


def test_landmarks_without_image(dataset: Path) -> None:
    write_landmarks(dataset / "landmarks" / "z.json", landmark_set(3))
    report = check_dataset(dataset)
    only_error_on(report, dataset / "landmarks" / "z.json", "no image")


def test_image_without_landmarks(dataset: Path) -> None:
    (dataset / "landmarks" / "b.csv").unlink()
    report = check_dataset(dataset)
    only_error_on(report, dataset / "images" / "b.mha", "no landmark file")


def test_invalid_case_id(dataset: Path) -> None:
    write_image(dataset / "images" / "x..y.png", image_array(), GEOMETRY)
    report = check_dataset(dataset)
    only_error_on(report, dataset / "images" / "x..y.png", "invalid case id")


def test_missing_images_folder_and_empty_dataset(dataset: Path) -> None:
    shutil.rmtree(dataset / "images")
    report = check_dataset(dataset)
    assert any(
        p.path == dataset / "images" and "missing images/" in p.message for p in report.errors
    )
    (dataset / "images").mkdir()
    report = check_dataset(dataset)
    assert any("holds no images" in p.message for p in report.errors)
    assert report.num_cases == 0


# --- splits -------------------------------------------------------------------------------


def test_split_with_escaping_id_is_an_error(dataset: Path) -> None:
    (dataset / "splits.json").write_text(json.dumps({"train": ["a", "../evil"], "test": ["c"]}))
    report = check_dataset(dataset)
    only_error_on(report, dataset / "splits.json", "invalid case id", "../evil")


def test_split_with_unknown_case_is_an_error(dataset: Path) -> None:
    (dataset / "splits.json").write_text(json.dumps({"train": ["a", "b", "nope"]}))
    report = check_dataset(dataset)
    only_error_on(report, dataset / "splits.json", "do not exist", "nope")


def test_case_in_two_splits_of_a_group_is_a_warning(dataset: Path) -> None:
    splits = {
        "train": ["a", "b"],
        "test": ["b", "c"],
        "fold0/train": ["a"],
        "fold0/val": ["b", "c"],
    }
    (dataset / "splits.json").write_text(json.dumps(splits))
    report = check_dataset(dataset)
    assert report.ok and report.errors == []
    assert len(report.warnings) == 1  # train/test share b; fold0/* and top-level are other groups
    assert "'train' and 'test'" in report.warnings[0].message and "b" in report.warnings[0].message


def test_splits_in_both_files_and_invalid_splits_json(dataset: Path) -> None:
    write_spec(dataset, spec(splits={"train": ["a"]}))
    (dataset / "splits.json").write_text(json.dumps({"train": ["b"]}))
    only_error_on(check_dataset(dataset), dataset / "splits.json", "both")
    write_spec(dataset, spec())
    (dataset / "splits.json").write_text("{not json")
    only_error_on(check_dataset(dataset), dataset / "splits.json", "invalid JSON")
    (dataset / "splits.json").write_text(json.dumps({"train": "a"}))
    only_error_on(check_dataset(dataset), dataset / "splits.json", "lists of case ids")


# --- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mha", ".png", ".jpg", ".nii", ".nii.gz"])
def test_truncated_image(dataset: Path, suffix: str) -> None:
    path = dataset / "images" / f"t{suffix}"
    write_image(path, image_array(shape=(120, 140)), Geometry.identity((120, 140), (0.5, 0.5)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    write_landmarks(dataset / "landmarks" / "t.json", landmark_set(1))
    report = check_dataset(dataset)
    only_error_on(report, path)


def test_zero_byte_image(dataset: Path) -> None:
    (dataset / "images" / "a.nii.gz").write_bytes(b"")
    only_error_on(check_dataset(dataset), dataset / "images" / "a.nii.gz", "empty")


def test_wrong_magic_bytes(dataset: Path) -> None:
    (dataset / "images" / "c.png").write_text("this is not a PNG image\n" * 20)
    only_error_on(check_dataset(dataset), dataset / "images" / "c.png", "not a PNG file")


def test_nan_pixels(dataset: Path) -> None:
    array = image_array(np.float32)
    array[3, 4] = np.nan
    write_image(dataset / "images" / "a.nii.gz", array, GEOMETRY)
    only_error_on(check_dataset(dataset), dataset / "images" / "a.nii.gz", "1 voxels are NaN")


def test_two_channels_where_one_is_declared(dataset: Path) -> None:
    write_image(dataset / "images" / "b.mha", np.stack([image_array(), image_array()]), GEOMETRY)
    only_error_on(check_dataset(dataset), dataset / "images" / "b.mha", "2 channels", "1 modality")


def test_3d_image_in_a_2d_dataset(dataset: Path) -> None:
    geometry = Geometry.identity((4, *SHAPE), (2.0, SPACING_MM, SPACING_MM))
    write_image(dataset / "images" / "a.nii.gz", image_array(shape=(4, *SHAPE)), geometry)
    report = check_dataset(dataset)
    only_error_on(report, dataset / "images" / "a.nii.gz", "3D", "spatial_dims 2")


def test_zero_spacing_in_header(dataset: Path) -> None:
    path = dataset / "images" / "b.mha"
    header, _, voxels = path.read_bytes().partition(b"ElementDataFile = LOCAL\n")
    header = header.replace(b"ElementSpacing = 0.5 0.5", b"ElementSpacing = 0 0.5")
    assert b"ElementSpacing = 0 0.5" in header
    path.write_bytes(header + b"ElementDataFile = LOCAL\n" + voxels)
    only_error_on(check_dataset(dataset), path, "spacing")


def test_png_without_spacing_in_dataset_json(dataset: Path) -> None:
    write_spec(dataset, spec(spacing_mm=None))
    only_error_on(check_dataset(dataset), dataset / "images" / "c.png", "spacing_mm")


# --- landmark files -------------------------------------------------------------------------


def test_isbi_txt_with_18_of_19_points(dataset: Path) -> None:
    path = dataset / "landmarks" / "c.txt"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:18]))
    only_error_on(check_dataset(dataset), path, "holds 18 landmarks, expected 19")


def test_csv_with_an_unknown_name(dataset: Path) -> None:
    landmarks = landmark_set(1)
    landmarks.names[6] = "Sella"
    write_landmarks(dataset / "landmarks" / "b.csv", landmarks)
    only_error_on(check_dataset(dataset), dataset / "landmarks" / "b.csv", "unknown", "Sella", "L7")


def test_landmark_file_checked_even_when_its_image_is_unreadable(dataset: Path) -> None:
    (dataset / "images" / "a.nii.gz").write_bytes(b"")
    landmarks = landmark_set(0)
    landmarks.names[0] = "Nasion"
    write_landmarks(dataset / "landmarks" / "a.json", landmarks)
    report = check_dataset(dataset)
    expected = [dataset / "images" / "a.nii.gz", dataset / "landmarks" / "a.json"]
    assert [p.path for p in report.errors] == expected


def test_landmark_outside_the_image_names_it_and_the_distance(dataset: Path) -> None:
    landmarks = landmark_set(0)
    # 5 mm beyond the last column's outer edge, along that axis only
    edge_mm = index_to_world(np.array([10.0, SHAPE[1] - 0.5]), GEOMETRY)
    landmarks.points_mm[1] = edge_mm + 5.0 * GEOMETRY.direction_matrix[:, 1]
    write_landmarks(dataset / "landmarks" / "a.json", landmarks)
    path = dataset / "landmarks" / "a.json"
    problem = only_error_on(check_dataset(dataset), path, "outside the image")
    assert "L2 (5.0 mm outside)" in problem.message
    assert "L1 " not in problem.message and "L3" not in problem.message


def test_missing_landmark_recorded_outside_is_only_a_warning(dataset: Path, capsys) -> None:
    landmarks = landmark_set(0)
    outside_mm = index_to_world(np.array([-10.5, 3.0]), GEOMETRY)  # 10 pixels = 5 mm above row 0
    landmarks.recorded_mm = np.full_like(landmarks.points_mm, np.nan)
    landmarks.recorded_mm[2] = outside_mm
    landmarks.points_mm[2] = np.nan
    write_landmarks(dataset / "landmarks" / "a.json", landmarks)
    report = check_dataset(dataset)
    assert report.ok and report.errors == []
    assert [p.path for p in report.warnings] == [dataset / "landmarks" / "a.json"]
    assert "L3 (5.0 mm outside)" in report.warnings[0].message
    assert main(["check", str(dataset)]) == 0
    assert "0 errors, 1 warning" in capsys.readouterr().err


def test_distance_outside_on_a_rotated_geometry() -> None:
    angle = np.deg2rad(30.0)
    rotation = ((np.cos(angle), -np.sin(angle)), (np.sin(angle), np.cos(angle)))
    geometry = Geometry((2.0, 0.5), (10.0, -4.0), rotation, (10, 20))
    index = np.array([[4.0, 5.0], [-3.5, 5.0], [12.5, 22.5], [4.0, 19.5]])
    distances = distance_outside_mm(index_to_world(index, geometry), geometry)
    np.testing.assert_allclose(distances, [0.0, 6.0, np.hypot(6.0, 1.5), 0.0], atol=1e-9)


# --- all at once, in order, printed ---------------------------------------------------------


def test_all_problems_reported_in_case_order(dataset: Path) -> None:
    for case_id in ("d", "e", "f", "g"):
        write_image(dataset / "images" / f"{case_id}.mha", image_array(), GEOMETRY)
        write_landmarks(dataset / "landmarks" / f"{case_id}.json", landmark_set(5))
    (dataset / "images" / "e.mha").write_bytes(b"")
    (dataset / "images" / "a.nii.gz").write_bytes(b"")
    (dataset / "landmarks" / "g.json").write_text("{}")
    (dataset / "landmarks" / "c.txt").write_text("1,2\n")
    first, second = check_dataset(dataset), check_dataset(dataset)
    assert first.problems == second.problems
    assert [p.path.name for p in first.errors] == ["a.nii.gz", "c.txt", "e.mha", "g.json"]
    assert first.num_cases == 7


def test_print_one_line_per_problem_with_markup_escaped(tmp_path: Path, capsys) -> None:
    report = CheckReport(
        tmp_path,
        [
            Problem(tmp_path / "x[1].png", "bad [bold]thing[/bold]"),
            Problem(tmp_path / "y.json", "odd", "warning"),
        ],
        num_cases=2,
    )
    print_check_report(report)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"error: {tmp_path / 'x[1].png'}: bad [bold]thing[/bold]",
        f"warning: {tmp_path / 'y.json'}: odd",
        "checked 2 cases: 1 error, 1 warning",
    ]


# --- real data: a small ISBI 2015 dataset with three broken cases ---------------------------


@pytest.mark.shared_data
def test_isbi_cases_with_three_broken_files_all_reported(
    shared_data: Path, tmp_path: Path, capsys
) -> None:
    source = shared_data / "isbi2015"
    if not source.is_dir():
        pytest.skip("../shared/data/isbi2015 not found: real-data test skipped")
    root = tmp_path / "isbi"
    (root / "images").mkdir(parents=True)
    (root / "landmarks").mkdir()
    names = [f"L{k}" for k in range(1, 20)]
    write_spec(
        root,
        DatasetSpec(
            name="isbi5",
            spatial_dims=2,
            landmarks=names,
            modalities=["xray"],
            spacing_mm=[0.1, 0.1],
            splits={"train": ["001", "002", "003"]},
        ),
    )
    for case_id in ("001", "002", "003", "004", "005"):
        jpg = source / "RawImage" / "TrainingData" / f"{case_id}.jpg"
        shutil.copyfile(jpg, root / "images" / jpg.name)
        annotation = source / "AnnotationsByMD" / "400_senior" / f"{case_id}.txt"
        shutil.copyfile(annotation, root / "landmarks" / annotation.name)
    clean = check_dataset(root)
    assert clean.ok and clean.problems == [], clean.problems

    truncated = root / "images" / "002.jpg"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    short = root / "landmarks" / "003.txt"
    short.write_text("".join(short.read_text().splitlines(keepends=True)[:18]))
    image = read_image(root / "images" / "004.jpg", spacing_xy_mm=[0.1, 0.1])
    voxels = image.array.astype(np.float32)
    voxels[0, 1000, 900] = np.nan
    write_image(root / "images" / "004.mha", voxels, image.geometry)
    (root / "images" / "004.jpg").unlink()

    report = check_dataset(root)
    assert [p.path for p in report.problems] == [truncated, short, root / "images" / "004.mha"]
    assert "truncated" in report.problems[0].message
    assert "18 landmarks, expected 19" in report.problems[1].message
    assert "NaN" in report.problems[2].message
    capsys.readouterr()
    assert main(["check", str(root)]) == 1
    printed = capsys.readouterr().err
    for path in (truncated, short, root / "images" / "004.mha"):
        assert f"error: {path}: " in printed
    assert "checked 5 cases: 3 errors, 0 warnings" in printed
