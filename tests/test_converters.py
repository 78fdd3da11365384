"""Converters: the real ISBI 2015, hand X-ray and AFIDs files, and small synthetic layouts."""

from __future__ import annotations

import csv
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medlandmark.datasets import converters
from medlandmark.datasets.converters import (
    AFIDS_LANDMARKS,
    HAND_LANDMARKS,
    ISBI_LANDMARKS,
    convert_afids,
    convert_hand_xray,
    convert_isbi2015,
)
from medlandmark.datasets.dataset import Dataset, DatasetSpec, load_spec, write_spec
from medlandmark.errors import DatasetError, ImageError, LandmarkFileError
from medlandmark.io.geometry import Geometry, world_to_index
from medlandmark.io.images import read_image, read_image_info, write_image
from medlandmark.io.landmarks import read_landmarks, write_landmarks

from .conftest import shared_path

AFIDS_DIR = "afids_mni152"
AFIDS_TEMPLATE = f"{AFIDS_DIR}/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
AFIDS_TRUTH = f"{AFIDS_DIR}/tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"


def isbi_pixels(path: Path) -> np.ndarray:
    """The first 19 ``x,y`` lines of an ISBI annotation, parsed here independently."""
    lines = path.read_text().splitlines()[:19]
    return np.array([[float(v) for v in line.split(",")] for line in lines])


def fcsv_lps(path: Path) -> np.ndarray:
    """x,y,z of a RAS (CoordinateSystem 0) .fcsv, flipped to LPS, parsed here independently."""
    rows = [r for r in csv.reader(path.read_text().splitlines()) if r and not r[0].startswith("#")]
    return np.array([[-float(r[1]), -float(r[2]), float(r[3])] for r in rows])


# --- ISBI 2015: real data -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def isbi_mean(tmp_path_factory) -> Path:
    src = shared_path("isbi2015")
    return convert_isbi2015(src, tmp_path_factory.mktemp("isbi") / "out")


def test_isbi_real_cases_and_splits(isbi_mean):
    dataset = Dataset(isbi_mean)
    assert dataset.case_ids == [f"{k:03d}" for k in range(1, 301)]
    assert dataset.splits() == {
        "train": [f"{k:03d}" for k in range(1, 151)],
        "test1": [f"{k:03d}" for k in range(151, 301)],
    }
    assert dataset.spec.spacing_mm == [0.1, 0.1]
    assert dataset.spec.landmarks == ISBI_LANDMARKS and len(ISBI_LANDMARKS) == 19
    assert dataset.spec.modalities == ["xray"] and dataset.spec.symmetric_pairs == []
    assert dataset.spec.reference and dataset.spec.license and "mean" in dataset.spec.description


@pytest.mark.parametrize("case_id", ["001", "150", "151", "300"])
def test_isbi_real_mean_landmarks_are_pixels_times_spacing(isbi_mean, case_id):
    src = shared_path("isbi2015")
    senior = isbi_pixels(src / "AnnotationsByMD" / "400_senior" / f"{case_id}.txt")
    junior = isbi_pixels(src / "AnnotationsByMD" / "400_junior" / f"{case_id}.txt")
    landmarks = Dataset(isbi_mean).read_landmarks(case_id)
    assert landmarks.names == ISBI_LANDMARKS
    np.testing.assert_allclose(landmarks.points_mm, (senior + junior) / 2 * 0.1, rtol=0, atol=1e-9)


def test_isbi_real_images_are_the_source_bytes(isbi_mean):
    src = shared_path("isbi2015")
    for case_id, folder in (("001", "TrainingData"), ("300", "Test1Data")):
        original = src / "RawImage" / folder / f"{case_id}.jpg"
        assert filecmp.cmp(original, isbi_mean / "images" / f"{case_id}.jpg", shallow=False)


def test_isbi_real_senior_annotator_is_exact(tmp_path):
    src = shared_path("isbi2015")
    out = convert_isbi2015(src, tmp_path / "senior", annotator="senior")
    dataset = Dataset(out)
    for case_id in ("002", "222"):
        senior = isbi_pixels(src / "AnnotationsByMD" / "400_senior" / f"{case_id}.txt")
        np.testing.assert_allclose(
            dataset.read_landmarks(case_id).points_mm, senior * 0.1, rtol=0, atol=1e-9
        )
    assert "senior" in dataset.spec.description


# --- ISBI 2015: synthetic layouts ---------------------------------------------------------------


def make_isbi(
    root: Path, cases: dict[str, list[str]], suffix: str = ".jpg"
) -> dict[str, np.ndarray]:
    """Fake official layout: tiny images per folder and two annotators' txt files (with the
    classification lines that follow the 19 points in the real files). Returns pixels by
    ``annotator/case``."""
    rng = np.random.default_rng(0)
    pixels = {}
    for folder, ids in cases.items():
        for case_id in ids:
            image = sitk.GetImageFromArray(rng.integers(0, 255, (40, 30), dtype=np.uint8))
            (root / "RawImage" / folder).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(root / "RawImage" / folder / f"{case_id}{suffix}"))
            for annotator in ("400_senior", "400_junior"):
                points = rng.integers(0, 30, (19, 2)).astype(float)
                pixels[f"{annotator}/{case_id}"] = points
                text = "".join(f"{int(x)},{int(y)}\n" for x, y in points) + "1\n3\n2\n"
                (root / "AnnotationsByMD" / annotator).mkdir(parents=True, exist_ok=True)
                (root / "AnnotationsByMD" / annotator / f"{case_id}.txt").write_text(text)
    return pixels


@pytest.mark.parametrize("annotator", ["mean", "senior", "junior"])
def test_isbi_synthetic_annotators(tmp_path, annotator):
    pixels = make_isbi(tmp_path / "src", {"TrainingData": ["001", "002"], "Test1Data": ["151"]})
    out = convert_isbi2015(tmp_path / "src", tmp_path / "out", annotator=annotator)
    dataset = Dataset(out)
    assert dataset.splits() == {"train": ["001", "002"], "test1": ["151"]}
    for case_id in ("001", "151"):
        senior, junior = pixels[f"400_senior/{case_id}"], pixels[f"400_junior/{case_id}"]
        expected = {"mean": (senior + junior) / 2, "senior": senior, "junior": junior}[annotator]
        np.testing.assert_allclose(
            dataset.read_landmarks(case_id).points_mm, expected * 0.1, atol=1e-9
        )


def test_isbi_test2_split_and_bmp_images(tmp_path):
    make_isbi(
        tmp_path / "src",
        {"TrainingData": ["001"], "Test1Data": ["151"], "Test2Data": ["301", "302"]},
        suffix=".bmp",
    )
    dataset = Dataset(convert_isbi2015(tmp_path / "src", tmp_path / "out"))
    assert dataset.splits() == {"train": ["001"], "test1": ["151"], "test2": ["301", "302"]}
    assert (tmp_path / "out" / "images" / "302.bmp").is_file()
    assert dataset.read_landmarks("302").points_mm.shape == (19, 2)


def test_isbi_annotation_with_18_points_names_the_file(tmp_path):
    make_isbi(tmp_path / "src", {"TrainingData": ["001", "002"]})
    bad = tmp_path / "src" / "AnnotationsByMD" / "400_junior" / "002.txt"
    bad.write_text("".join(bad.read_text().splitlines(keepends=True)[:18]))
    with pytest.raises(LandmarkFileError) as error:
        convert_isbi2015(tmp_path / "src", tmp_path / "out")
    assert error.value.path == bad and "18" in str(error.value) and "19" in str(error.value)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_isbi_missing_annotation_names_the_file(tmp_path):
    make_isbi(tmp_path / "src", {"TrainingData": ["001"], "Test1Data": ["151"]})
    missing = tmp_path / "src" / "AnnotationsByMD" / "400_senior" / "151.txt"
    missing.unlink()
    with pytest.raises(LandmarkFileError) as error:
        convert_isbi2015(tmp_path / "src", tmp_path / "out")
    assert error.value.path == missing and "missing" in str(error.value)
    # the junior annotations alone are complete
    convert_isbi2015(tmp_path / "src", tmp_path / "junior", annotator="junior")


def test_isbi_wrong_layout_is_a_clear_error(tmp_path):
    (tmp_path / "src" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="RawImage"):
        convert_isbi2015(tmp_path / "src", tmp_path / "out")
    make_isbi(tmp_path / "src2", {"TrainingData": ["001"]})
    (tmp_path / "src2" / "AnnotationsByMD" / "400_junior" / "001.txt").unlink()
    (tmp_path / "src2" / "AnnotationsByMD" / "400_junior").rmdir()
    with pytest.raises(DatasetError, match="400_junior"):
        convert_isbi2015(tmp_path / "src2", tmp_path / "out")


def test_isbi_output_folder_rules(tmp_path):
    make_isbi(tmp_path / "src", {"TrainingData": ["001"]})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        convert_isbi2015(tmp_path / "src", foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    out = convert_isbi2015(tmp_path / "src", tmp_path / "out")
    convert_isbi2015(tmp_path / "src", out, annotator="senior")  # re-running replaces it
    assert "senior" in load_spec(out).description
    other = tmp_path / "other"
    write_spec(other, DatasetSpec(name="x", spatial_dims=2, landmarks=["a", "b"]))
    with pytest.raises(DatasetError, match="different dataset"):
        convert_isbi2015(tmp_path / "src", other)


def test_isbi_rerun_keeps_old_dataset_on_bad_source_and_shows_half_written(tmp_path, monkeypatch):
    make_isbi(tmp_path / "src", {"TrainingData": ["001", "002"]})
    out = convert_isbi2015(tmp_path / "src", tmp_path / "out")
    bad = tmp_path / "src" / "AnnotationsByMD" / "400_senior" / "002.txt"
    good_text = bad.read_text()
    bad.write_text("1,2\n")
    with pytest.raises(LandmarkFileError):
        convert_isbi2015(tmp_path / "src", out)
    assert Dataset(out).case_ids == ["001", "002"]  # nothing was touched
    bad.write_text(good_text)
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("disk full")
        return write_landmarks(*args, **kwargs)

    monkeypatch.setattr(converters, "write_landmarks", failing_write)
    with pytest.raises(OSError, match="disk full"):
        convert_isbi2015(tmp_path / "src", out, annotator="junior")
    assert not (out / "dataset.json").exists()


# --- Hand X-rays ---------------------------------------------------------------------------------


def header_spacing_origin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    assert np.allclose(reader.GetDirection(), np.eye(3).ravel())
    return np.array(reader.GetSpacing()[:2]), np.array(reader.GetOrigin()[:2])


def test_hand_real_landmarks_are_pixels_times_header_spacing(tmp_path):
    src = shared_path("hand_xray")
    dataset = Dataset(convert_hand_xray(src, tmp_path / "out"))
    rows = list(csv.reader((src / "landmarks_px.csv").read_text().splitlines()))[1:]
    pixels = {r[0]: np.array(r[1:], dtype=float).reshape(37, 2) for r in rows}
    assert dataset.case_ids == sorted(pixels) and len(dataset.case_ids) == 9
    assert dataset.spec.landmarks == HAND_LANDMARKS and dataset.spec.spatial_dims == 2
    spacings = set()
    for case_id in dataset.case_ids:
        spacing, origin = header_spacing_origin(src / "images" / f"{case_id}.mha")
        spacings.add(float(spacing[0]))
        np.testing.assert_allclose(
            dataset.read_landmarks(case_id).points_mm, origin + pixels[case_id] * spacing, atol=1e-9
        )
    assert len(spacings) > 1  # the per-image spacing really differs


def make_hand(root: Path, spacings: dict[str, float], rows: dict[str, np.ndarray]) -> None:
    (root / "images").mkdir(parents=True)
    for case_id, spacing in spacings.items():
        image = sitk.GetImageFromArray(np.zeros((1, 50, 40), dtype=np.uint8))
        image.SetSpacing((spacing, spacing, spacing))
        image.SetOrigin((5.0, -3.0, 0.0))
        sitk.WriteImage(image, str(root / "images" / f"{case_id}.mha"))
    lines = ["id," + ",".join(f"x{k},y{k}" for k in range(1, 38))]
    lines += [
        f"{case_id}," + ",".join(str(v) for v in points.ravel()) for case_id, points in rows.items()
    ]
    (root / "landmarks_px.csv").write_text("\n".join(lines) + "\n")


def test_hand_synthetic_spacing_per_image(tmp_path):
    rng = np.random.default_rng(1)
    rows = {"a1": rng.uniform(0, 39, (37, 2)), "b2": rng.uniform(0, 39, (37, 2))}
    make_hand(tmp_path / "src", {"a1": 0.1, "b2": 0.25}, rows)
    dataset = Dataset(convert_hand_xray(tmp_path / "src", tmp_path / "out"))
    for case_id, spacing in (("a1", 0.1), ("b2", 0.25)):
        expected = np.array([5.0, -3.0]) + rows[case_id] * spacing
        np.testing.assert_allclose(dataset.read_landmarks(case_id).points_mm, expected, atol=1e-9)
        assert (
            read_image_info(dataset.case(case_id).image_path).geometry.spacing_mm == (spacing,) * 2
        )


@pytest.mark.parametrize(
    ("spacings", "row_ids", "count", "error", "message"),
    [
        ({"a1": 0.1, "b2": 0.2}, ["a1"], 37, LandmarkFileError, "no landmark row for images: b2"),
        ({"a1": 0.1}, ["a1", "zz"], 37, DatasetError, "without an image.*zz"),
        ({"a1": 0.1}, ["a1"], 36, LandmarkFileError, "expected 37"),
    ],
)
def test_hand_mismatches_are_errors(tmp_path, spacings, row_ids, count, error, message):
    make_hand(tmp_path / "src", spacings, {i: np.ones((count, 2)) for i in row_ids})
    with pytest.raises(error, match=message) as raised:
        convert_hand_xray(tmp_path / "src", tmp_path / "out")
    assert raised.value.path == tmp_path / "src" / "landmarks_px.csv"
    assert not (tmp_path / "out").exists()


# --- AFIDs ---------------------------------------------------------------------------------------


def test_afids_real_ground_truth(tmp_path):
    image, truth = shared_path(AFIDS_TEMPLATE), shared_path(AFIDS_TRUTH)
    out = convert_afids(image, truth, tmp_path / "out", case_id="mni")
    dataset = Dataset(out)
    assert dataset.case_ids == ["mni"] and dataset.spec.spatial_dims == 3
    assert dataset.spec.landmarks == AFIDS_LANDMARKS and dataset.spec.modalities == ["mr"]
    assert ("RSLMS", "LSLMS") in dataset.spec.symmetric_pairs and len(
        dataset.spec.symmetric_pairs
    ) == 11
    written = out / "landmarks" / "mni.mrk.json"
    assert json.loads(written.read_text())["markups"][0]["coordinateSystem"] == "LPS"
    landmarks = dataset.read_landmarks("mni")
    assert landmarks.names == AFIDS_LANDMARKS
    np.testing.assert_allclose(landmarks.points_mm, fcsv_lps(truth), rtol=0, atol=1e-6)
    volume = read_image(dataset.case("mni").image_path)
    assert filecmp.cmp(image, dataset.case("mni").image_path, shallow=False)
    ac_index = np.round(world_to_index(landmarks.points_mm[0], volume.geometry)).astype(int)
    assert volume.geometry.contains_index(ac_index)
    assert volume.array[(0, *ac_index)] > volume.array.mean()


@pytest.mark.parametrize("rater", [1, 2, 3, 4])
def test_afids_real_raters_add_cases_and_match_truth(tmp_path, rater):
    image, truth = shared_path(AFIDS_TEMPLATE), shared_path(AFIDS_TRUTH)
    rater_file = shared_path(
        f"{AFIDS_DIR}/raters/tpl-MNI152NLin2009cAsym_res-01_desc-rater{rater:02d}_afids.fcsv"
    )
    out = convert_afids(image, truth, tmp_path / "out")
    convert_afids(image, rater_file, out, case_id=f"rater{rater}")
    dataset = Dataset(out)
    assert dataset.case_ids == sorted(["tpl-MNI152NLin2009cAsym_res-01_T1w", f"rater{rater}"])
    rated = dataset.read_landmarks(f"rater{rater}")
    assert rated.names == AFIDS_LANDMARKS
    np.testing.assert_allclose(rated.points_mm, fcsv_lps(rater_file), atol=1e-6)
    # mapped by order, every point lies near its ground truth (raters are ~1.3 mm off on average)
    errors_mm = np.linalg.norm(rated.points_mm - fcsv_lps(truth), axis=1)
    assert errors_mm.mean() < 2.5 and errors_mm.max() < 10


def write_fcsv(path: Path, points_ras: np.ndarray) -> None:
    lines = [
        "# Markups fiducial file version = 4.10",
        "# CoordinateSystem = 0",
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    lines += [
        f"n{k},{x},{y},{z},0,0,0,1,1,1,0,{k + 1},,vol" for k, (x, y, z) in enumerate(points_ras)
    ]
    path.write_text("\n".join(lines) + "\n")


def small_volume(path: Path) -> Geometry:
    geometry = Geometry((2.0, 1.0, 1.5), (10.0, -20.0, 5.0), np.fliplr(np.eye(3)), (12, 14, 16))
    write_image(path, np.arange(12 * 14 * 16, dtype=np.int16).reshape(12, 14, 16), geometry)
    return geometry


def test_afids_synthetic_nrrd_becomes_nifti(tmp_path):
    geometry = small_volume(tmp_path / "brain.nrrd")
    points_ras = np.random.default_rng(2).uniform(-2, 8, (32, 3)) * [-1, -1, 1] + [-12, 25, 10]
    write_fcsv(tmp_path / "brain.fcsv", points_ras)
    out = convert_afids(tmp_path / "brain.nrrd", tmp_path / "brain.fcsv", tmp_path / "out")
    dataset = Dataset(out)
    assert dataset.case_ids == ["brain"]
    copied = dataset.read_image("brain")
    assert dataset.case("brain").image_path.name == "brain.nii.gz"
    np.testing.assert_allclose(copied.geometry.spacing_mm, geometry.spacing_mm)
    np.testing.assert_allclose(copied.geometry.origin_mm, geometry.origin_mm)
    np.testing.assert_array_equal(copied.array, read_image(tmp_path / "brain.nrrd").array)
    np.testing.assert_allclose(
        dataset.read_landmarks("brain").points_mm, points_ras * [-1, -1, 1], atol=1e-9
    )


def test_afids_wrong_point_count_and_foreign_outputs(tmp_path):
    small_volume(tmp_path / "brain.nii.gz")
    write_fcsv(tmp_path / "p31.fcsv", np.zeros((31, 3)))
    with pytest.raises(LandmarkFileError, match="31 points") as error:
        convert_afids(tmp_path / "brain.nii.gz", tmp_path / "p31.fcsv", tmp_path / "out")
    assert error.value.path == tmp_path / "p31.fcsv"
    assert not (tmp_path / "out").exists()
    write_fcsv(tmp_path / "ok.fcsv", np.zeros((32, 3)))
    other = tmp_path / "other"
    write_spec(other, DatasetSpec(name="x", spatial_dims=3, landmarks=["a"]))
    with pytest.raises(DatasetError, match="different dataset"):
        convert_afids(tmp_path / "brain.nii.gz", tmp_path / "ok.fcsv", other)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.nii").write_bytes(b"")
    with pytest.raises(DatasetError, match="not empty"):
        convert_afids(tmp_path / "brain.nii.gz", tmp_path / "ok.fcsv", tmp_path / "foreign")
    with pytest.raises(DatasetError, match="case id"):
        convert_afids(
            tmp_path / "brain.nii.gz", tmp_path / "ok.fcsv", tmp_path / "out", case_id="../up"
        )


def test_afids_needs_a_3d_image(tmp_path):
    write_image(tmp_path / "flat.nii.gz", np.zeros((8, 9), np.uint8), Geometry.identity((8, 9)))
    write_fcsv(tmp_path / "ok.fcsv", np.zeros((32, 3)))
    with pytest.raises(ImageError, match="3D"):
        convert_afids(tmp_path / "flat.nii.gz", tmp_path / "ok.fcsv", tmp_path / "out")


def test_afids_mrk_json_input_round_trips(tmp_path):
    small_volume(tmp_path / "brain.nii.gz")
    write_fcsv(tmp_path / "a.fcsv", np.arange(96, dtype=float).reshape(32, 3) / 10)
    first = convert_afids(
        tmp_path / "brain.nii.gz", tmp_path / "a.fcsv", tmp_path / "one", case_id="c1"
    )
    again = convert_afids(
        tmp_path / "brain.nii.gz",
        first / "landmarks" / "c1.mrk.json",
        tmp_path / "two",
        case_id="c1",
    )
    np.testing.assert_allclose(
        read_landmarks(again / "landmarks" / "c1.mrk.json").points_mm,
        read_landmarks(first / "landmarks" / "c1.mrk.json").points_mm,
        atol=1e-12,
    )


def test_hand_xray_holds_out_every_fourth_case_for_testing(tmp_path):
    rng = np.random.default_rng(2)
    ids = [f"c{i}" for i in range(8)]
    make_hand(
        tmp_path / "src", dict.fromkeys(ids, 0.1), {c: rng.uniform(0, 39, (37, 2)) for c in ids}
    )
    spec = load_spec(convert_hand_xray(tmp_path / "src", tmp_path / "out"))
    assert spec.splits == {"train": ["c0", "c1", "c2", "c4", "c5", "c6"], "test": ["c3", "c7"]}


def test_converting_again_keeps_splits_edited_by_hand_unless_forced(tmp_path):
    make_isbi(tmp_path / "src", {"TrainingData": ["001", "002", "003"]})
    out = convert_isbi2015(tmp_path / "src", tmp_path / "out")
    convert_isbi2015(tmp_path / "src", out)  # the same splits: converted again without a word
    spec = json.loads((out / "dataset.json").read_text())
    spec["splits"] = {"train": ["001", "002"], "test": ["003"]}
    (out / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match="other splits .*train 2 cases, test 1 cases.*--force"):
        convert_isbi2015(tmp_path / "src", out, annotator="senior")
    assert load_spec(out).splits["test"] == ["003"]  # nothing was touched
    convert_isbi2015(tmp_path / "src", out, annotator="senior", force=True)
    assert load_spec(out).splits == {"train": ["001", "002", "003"]}
