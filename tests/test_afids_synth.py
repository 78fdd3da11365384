"""convert afids-synth: random warps of the MNI template whose landmarks are mapped exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medlandmark.cli import main
from medlandmark.datasets.afids_synth import (
    Crop,
    SynthOptions,
    case_rng,
    convert_afids_synth,
    draw_case,
    load_template,
    make_template,
    synth_case,
    synth_splits,
)
from medlandmark.datasets.check import check_dataset
from medlandmark.datasets.converters import AFIDS_LANDMARKS
from medlandmark.datasets.dataset import Dataset
from medlandmark.io.geometry import Geometry, index_to_world, world_to_index
from medlandmark.io.images import read_image, read_image_info, write_image
from medlandmark.io.landmarks import LandmarkSet

from .conftest import shared_path

AFIDS_TEMPLATE = "afids_mni152/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
AFIDS_TRUTH = "afids_mni152/tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"
FAST = SynthOptions(spacing_scale=3.0)  # coarse grids: the geometry is what these tests look at
BLOB_SIGMA_MM = 2.5
TEMPLATE_DIRECTION = ((0.0, 0.0, -1.0), (0.0, -1.0, 0.0), (1.0, 0.0, 0.0))  # like the MNI file's


@pytest.fixture(scope="module")
def mni():
    return load_template(shared_path(AFIDS_TEMPLATE), shared_path(AFIDS_TRUTH))


@pytest.fixture(scope="module")
def cli_dataset(tmp_path_factory) -> Path:
    """Three full-size cases written by the command line (seed 1)."""
    out = tmp_path_factory.mktemp("synth") / "out"
    template, truth = str(shared_path(AFIDS_TEMPLATE)), str(shared_path(AFIDS_TRUTH))
    argv = ["convert", "afids-synth", template, truth, str(out), "--cases", "3", "--seed", "1"]
    assert main(argv) == 0
    return out


def blob_template() -> tuple[np.ndarray, Geometry, LandmarkSet]:
    """A 2 mm ellipsoid "head" with a dark cavity holding a bright Gaussian blob at landmark 0."""
    geometry = Geometry((2.0, 2.0, 2.0), (60.0, 70.0, -60.0), TEMPLATE_DIRECTION, (64, 72, 64))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), axis=-1)
    world_mm = index_to_world(index.astype(np.float64), geometry)
    centre_mm = index_to_world((np.asarray(geometry.shape) - 1) / 2.0, geometry)
    head = np.sum(((world_mm - centre_mm) / [50.0, 60.0, 50.0]) ** 2, axis=-1) < 1.0
    rng = np.random.default_rng(7)
    points_mm = centre_mm + rng.uniform(-25.0, 25.0, (len(AFIDS_LANDMARKS), 3))
    blob_mm = points_mm[0] = centre_mm + [12.0, -15.0, 10.0]
    distance_mm = np.linalg.norm(world_mm - blob_mm, axis=-1)
    array = np.where(head & (distance_mm > 16.0), 1.0, 0.0)
    array += 4.0 * np.exp(-0.5 * (distance_mm / BLOB_SIGMA_MM) ** 2)
    return array.astype(np.float32), geometry, LandmarkSet(AFIDS_LANDMARKS, points_mm)


def blob_centre_mm(path: Path, radius_mm: float = 10.0) -> np.ndarray:
    """Intensity centroid (world mm, background median removed) within ``radius_mm`` of the
    brightest voxel of the image file."""
    image = read_image(path)
    array, geometry = image.array[0].astype(np.float64), image.geometry
    peak = np.array(np.unravel_index(np.argmax(array), array.shape))
    half = np.ceil(radius_mm / np.asarray(geometry.spacing_mm)).astype(int) + 1
    low, high = np.maximum(peak - half, 0), np.minimum(peak + half + 1, array.shape)
    box = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high, strict=True)], indexing="ij"), -1
    )
    values = array[tuple(box[..., axis] for axis in range(3))]
    world_mm = index_to_world(box.astype(np.float64), geometry)
    inside = np.linalg.norm(world_mm - index_to_world(peak.astype(np.float64), geometry), axis=-1)
    inside = inside <= radius_mm
    weights = values[inside] - np.median(values[inside])
    return (weights[:, None] * world_mm[inside]).sum(axis=0) / weights.sum()


# --- the warp ------------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_real_landmarks_map_back_through_the_resampling_warp(mni, index):
    draw = draw_case(case_rng(0, index), FAST)
    case = synth_case(mni, dataclasses.replace(draw, crop=None), FAST)
    truth = mni.landmarks.points_mm
    mapped = case.warp.to_case(truth)
    transform = case.warp.transform()  # the one the image was resampled through
    back = np.array([transform.TransformPoint(p) for p in mapped.tolist()])
    assert np.abs(back - truth).max() < 1e-4
    present = case.landmarks.present
    np.testing.assert_array_equal(case.landmarks.points_mm[present], mapped[present])
    # neither the affine nor the elastic part is the identity at the landmarks
    assert np.linalg.norm(mapped - truth, axis=1).max() > 1.0
    affine_only = np.array(
        [case.warp.affine.GetInverse().TransformPoint(p) for p in truth.tolist()]
    )
    assert np.linalg.norm(mapped - affine_only, axis=1).max() > 0.2


def test_random_draws_follow_the_seed_and_the_case_index():
    first, again = (
        draw_case(case_rng(3, 5), SynthOptions()),
        draw_case(case_rng(3, 5), SynthOptions()),
    )
    for field in dataclasses.fields(first):
        np.testing.assert_array_equal(getattr(first, field.name), getattr(again, field.name))
    assert not np.array_equal(
        first.rotation_deg, draw_case(case_rng(4, 5), SynthOptions()).rotation_deg
    )
    assert not np.array_equal(
        first.rotation_deg, draw_case(case_rng(3, 6), SynthOptions()).rotation_deg
    )
    draws = [draw_case(case_rng(0, k), SynthOptions()) for k in range(60)]
    assert {d.spacing_mm for d in draws} == set(SynthOptions().spacings_mm)
    assert 8 <= sum(d.crop is not None for d in draws) <= 30
    for d in draws:
        np.testing.assert_allclose(d.direction.T @ d.direction, np.eye(3), atol=1e-12)
        assert np.linalg.det(d.direction) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("spacing_mm", "direction", "seed"),
    [
        (
            (3.0, 1.0, 1.0),
            ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)),
            0,
        ),  # slabs, reoriented
        (
            (1.2, 1.2, 1.2),
            Rotation.from_euler("zyx", [20.0, -12.0, 15.0], degrees=True).as_matrix(),
            1,
        ),
        ((1.0, 1.0, 3.0), TEMPLATE_DIRECTION, 2),
        ((2.0, 1.0, 1.0), np.diag([1.0, 1.0, -1.0]), 3),  # a grid stored mirrored (det -1)
    ],
)
def test_blob_in_the_image_lands_on_the_mapped_landmark(tmp_path, spacing_mm, direction, seed):
    array, geometry, landmarks = blob_template()
    template = make_template(array, geometry, landmarks)
    options = SynthOptions()
    draw = dataclasses.replace(
        draw_case(case_rng(seed, 0), options),
        spacing_mm=spacing_mm,
        direction=np.asarray(direction, dtype=np.float64),
        crop=None,
    )
    case = synth_case(template, draw, options)
    write_image(tmp_path / "case.nii.gz", case.array, case.geometry)
    written = read_image_info(tmp_path / "case.nii.gz").geometry
    np.testing.assert_allclose(written.direction_matrix, direction, atol=1e-6)
    np.testing.assert_allclose(written.spacing_mm, spacing_mm, atol=1e-6)
    expected_mm = case.landmarks.points_mm[0]
    assert case.landmarks.present[0]
    assert np.linalg.norm(expected_mm - landmarks.points_mm[0]) > 1.0  # the warp moved it
    assert np.linalg.norm(blob_centre_mm(tmp_path / "case.nii.gz") - expected_mm) < 0.5


def test_the_strong_variation_draws_wider_and_keeps_the_default_draws():
    from medlandmark.datasets.afids_synth import STRONGER_SPACINGS_MM, VARIATIONS

    default = [draw_case(case_rng(0, i), SynthOptions()) for i in range(3)]
    again = [draw_case(case_rng(0, i), VARIATIONS["default"]) for i in range(3)]
    assert [d.spacing_mm for d in default] == [d.spacing_mm for d in again]
    strong = [draw_case(case_rng(1, i), VARIATIONS["strong"]) for i in range(40)]
    assert {d.spacing_mm for d in strong} <= set(STRONGER_SPACINGS_MM)
    assert any(np.linalg.det(d.direction) < 0 for d in strong)  # mirrored grids
    assert any(np.linalg.det(d.direction) > 0 for d in strong)
    assert max(abs(d.rotation_deg).max() for d in strong) > 15.0  # beyond the default range


# --- fields of view ------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize(("axis", "keep_low"), [(0, True), (1, False), (2, True)])
def test_crops_mark_exactly_the_landmarks_outside_the_grid_missing(mni, axis, keep_low):
    draw = draw_case(case_rng(0, 10 + axis), FAST)
    whole = synth_case(mni, dataclasses.replace(draw, crop=None), FAST)
    cut = synth_case(mni, dataclasses.replace(draw, crop=Crop(axis, keep_low, 0.5)), FAST)
    assert whole.landmarks.present.all()
    assert cut.geometry.shape[axis] < whole.geometry.shape[axis]
    mapped = cut.warp.to_case(mni.landmarks.points_mm)
    index = world_to_index(mapped, cut.geometry)
    inside = np.all((index >= -0.5) & (index <= np.asarray(cut.geometry.shape) - 0.5), axis=1)
    np.testing.assert_array_equal(cut.landmarks.present, inside)
    assert 0 < inside.sum() < len(inside)
    np.testing.assert_array_equal(cut.landmarks.points_mm[inside], mapped[inside])
    assert np.isnan(cut.landmarks.points_mm[~inside]).all()


# --- the dataset and the command line ------------------------------------------------------------


@pytest.mark.shared_data
def test_cli_dataset_passes_check_with_splits_and_missing_points_read_back(cli_dataset):
    report = check_dataset(cli_dataset)
    assert report.ok and not report.problems, [str(p) for p in report.problems]
    dataset = Dataset(cli_dataset)
    assert dataset.case_ids == ["synth000", "synth001", "synth002"]
    assert dataset.spec.spatial_dims == 3 and dataset.spec.landmarks == AFIDS_LANDMARKS
    assert dataset.splits() == {"train": ["synth000", "synth001"], "test": ["synth002"]}
    template = read_image_info(shared_path(AFIDS_TEMPLATE)).geometry
    for case_id in dataset.case_ids:
        image = dataset.read_image(case_id)
        assert image.array.dtype == np.int16 and np.prod(image.geometry.shape) <= 160**3
        assert not np.allclose(image.geometry.direction_matrix, template.direction_matrix)
        landmarks = dataset.read_landmarks(case_id, image)
        assert landmarks.present.sum() >= 1
        assert np.array_equal(landmarks.present, image.geometry.contains_world(landmarks.points_mm))


@pytest.mark.shared_data
def test_same_seed_same_files_whatever_the_number_of_cases(cli_dataset, tmp_path):
    out = convert_afids_synth(
        shared_path(AFIDS_TEMPLATE), shared_path(AFIDS_TRUTH), tmp_path / "again", cases=2, seed=1
    )
    first, again = Dataset(cli_dataset), Dataset(out)
    assert again.case_ids == ["synth000", "synth001"]
    for case_id in again.case_ids:
        image, image_again = first.read_image(case_id), again.read_image(case_id)
        assert image.geometry == image_again.geometry
        np.testing.assert_array_equal(image.array, image_again.array)
        np.testing.assert_array_equal(
            first.read_landmarks(case_id).points_mm, again.read_landmarks(case_id).points_mm
        )


def test_cli_refuses_no_cases(tmp_path):
    argv = ["convert", "afids-synth", "t.nii.gz", "p.fcsv", str(tmp_path / "out"), "--cases", "0"]
    assert main(argv) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("cases", "train", "test"),
    [(1, 1, 0), (2, 1, 1), (3, 2, 1), (10, 7, 3), (59, 39, 20), (60, 40, 20), (100, 80, 20)],
)
def test_split_sizes(cases, train, test):
    ids = [f"c{k:03d}" for k in range(cases)]
    splits = synth_splits(ids)
    assert len(splits["train"]) == train and len(splits.get("test", [])) == test
    assert sorted(splits["train"] + splits.get("test", [])) == ids
    if cases >= 60:
        assert splits["test"] == ids[40:60] and splits["train"][:40] == ids[:40]
