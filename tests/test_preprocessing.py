"""Preprocessing: the cache geometry describes the resampled voxels; idempotent; interruptible."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medlandmark.datasets.dataset import DatasetSpec, write_spec
from medlandmark.errors import MedlandmarkError
from medlandmark.io.geometry import Geometry, index_to_world, world_to_index
from medlandmark.io.images import write_image
from medlandmark.io.landmarks import LandmarkSet, read_landmarks, write_landmarks
from medlandmark.planning import load_plan, plan_dataset
from medlandmark.preprocessing import cache_folder, load_cached_case, preprocess_dataset

NAMES = ["a", "b", "c"]


BLOB_SIGMA_MM = 4.0


def _blob_dataset(root: Path, cases: int = 3) -> Path:
    """3D oblique, anisotropic images (thick last axis) with well-separated Gaussian blobs at
    the landmarks."""
    for case in range(cases):
        rng = np.random.default_rng(case)
        direction = Rotation.from_euler("xyz", rng.uniform(-0.4, 0.4, 3)).as_matrix()
        shape = (70, 64, 22)
        spacing = (1.0, 1.1, 3.5 + 0.5 * case)
        geometry = Geometry(
            spacing, tuple(rng.uniform(-20, 20, 3)), tuple(map(tuple, direction)), shape
        )
        index = np.array([[20.0, 20.0, 8.0], [48.0, 22.0, 13.0], [30.0, 44.0, 11.0]]) + rng.uniform(
            -2, 2, (3, 3)
        )
        world = index_to_world(index, geometry)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
        grid_world = index_to_world(grid.reshape(-1, 3), geometry).reshape(*shape, 3)
        image = np.zeros(shape, np.float32)
        for point in world:
            image += 1000 * np.exp(
                -np.sum((grid_world - point) ** 2, axis=-1) / (2 * BLOB_SIGMA_MM**2)
            )
        write_image(root / "images" / f"case{case}.nii.gz", image, geometry)
        write_landmarks(root / "landmarks" / f"case{case}.mrk.json", LandmarkSet(NAMES, world))
    write_spec(root, DatasetSpec(name="blobs", spatial_dims=3, landmarks=NAMES, modalities=["mr"]))
    return root


def _weighted_centroid(image: np.ndarray, centre: np.ndarray, spacing_mm) -> np.ndarray:
    """Intensity centroid in a window of 3 blob sigmas around ``centre`` (voxel indices)."""
    radius = np.ceil(3 * BLOB_SIGMA_MM / np.asarray(spacing_mm)).astype(int)
    low = np.maximum(np.round(centre).astype(int) - radius, 0)
    high = np.minimum(np.round(centre).astype(int) + radius + 1, image.shape)
    window = image[tuple(slice(a, b) for a, b in zip(low, high, strict=True))].astype(np.float64)
    window = np.clip(window - window.min(), 0, None)
    grid = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high, strict=True)], indexing="ij"),
        axis=-1,
    )
    return (grid * window[..., None]).reshape(-1, len(centre)).sum(0) / window.sum()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    root = _blob_dataset(tmp_path_factory.mktemp("blobs"))
    plan_dataset(root)
    preprocess_dataset(root, workers=1)
    return root


def test_blobs_sit_at_the_cached_landmark_indices(blobs: Path) -> None:
    plan = load_plan(blobs / "preprocessed")
    # the files' array axes run near world (x, y, z): reorientation puts z, the thick axis, first
    assert plan.reorient and plan.transpose_forward == [0, 1, 2]
    for config in plan.configurations.values():
        for case in ("case0", "case1", "case2"):
            cached = load_cached_case(cache_folder(blobs / "preprocessed", config), case)
            assert (
                cached.image.dtype == np.float16 and cached.geometry.shape == cached.image.shape[1:]
            )
            assert (
                np.argmax(np.abs(cached.geometry.direction_matrix[:, 0])) == 2
            )  # first axis along world z
            for index in cached.landmarks_index:
                image = np.asarray(cached.image[0], np.float32)
                found = _weighted_centroid(image, index, cached.geometry.spacing_mm)
                assert np.abs(found - index).max() < 0.2, (config.name, case, found, index)


def test_cache_landmarks_map_back_to_world_exactly(blobs: Path) -> None:
    plan = load_plan(blobs / "preprocessed")
    for config in plan.configurations.values():
        for case in ("case0", "case1", "case2"):
            cached = load_cached_case(cache_folder(blobs / "preprocessed", config), case)
            original = read_landmarks(blobs / "landmarks" / f"{case}.mrk.json")
            back = index_to_world(cached.landmarks_index, cached.geometry)
            assert np.abs(back - original.points_mm).max() < 1e-3


def test_rerun_skips_up_to_date_cases_and_redoes_changed_ones(tmp_path: Path) -> None:
    root = _blob_dataset(tmp_path / "ds", cases=2)
    plan_dataset(root)
    first = preprocess_dataset(root, workers=1)
    assert all(counts["done"] == 2 for counts in first.values())
    assert all(
        counts == {"done": 0, "skipped": 2}
        for counts in preprocess_dataset(root, workers=1).values()
    )
    landmark_file = root / "landmarks" / "case1.mrk.json"
    moved = read_landmarks(landmark_file)
    moved.points_mm[0] += 1.0
    write_landmarks(landmark_file, moved)
    again = preprocess_dataset(root, workers=1)
    assert all(counts == {"done": 1, "skipped": 1} for counts in again.values())
    config = next(iter(load_plan(root / "preprocessed").configurations.values()))
    cached = load_cached_case(cache_folder(root / "preprocessed", config), "case1")
    assert (
        np.abs(index_to_world(cached.landmarks_index, cached.geometry) - moved.points_mm).max()
        < 1e-3
    )


def test_case_without_completion_marker_is_absent_and_redone(tmp_path: Path) -> None:
    root = _blob_dataset(tmp_path / "ds", cases=2)
    plan_dataset(root)
    preprocess_dataset(root, workers=1)
    config = next(iter(load_plan(root / "preprocessed").configurations.values()))
    folder = cache_folder(root / "preprocessed", config)
    complete = (folder / "case0.npy").read_bytes()
    (folder / "case0.json").unlink()  # as if killed between the voxels and the marker
    (folder / "case0.npy").write_bytes(complete[: len(complete) // 3])
    with pytest.raises(MedlandmarkError, match="not in the cache"):
        load_cached_case(folder, "case0")
    counts = preprocess_dataset(root, workers=1, configurations=[config.name])
    assert counts[folder.name] == {"done": 1, "skipped": 1}
    assert (folder / "case0.npy").read_bytes() == complete
    assert not [p for p in folder.iterdir() if ".partial" in p.name]


def test_parallel_workers_write_the_same_cache(tmp_path: Path) -> None:
    serial, parallel = _blob_dataset(tmp_path / "s", 3), _blob_dataset(tmp_path / "p", 3)
    for root, workers in ((serial, 1), (parallel, 2)):
        plan_dataset(root)
        preprocess_dataset(root, workers=workers)
    config = next(iter(load_plan(serial / "preprocessed").configurations.values()))
    for case in ("case0", "case1", "case2"):
        a = load_cached_case(cache_folder(serial / "preprocessed", config), case)
        b = load_cached_case(cache_folder(parallel / "preprocessed", config), case)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.landmarks_index, b.landmarks_index)


def _assert_round_trip(root: Path, configurations: list[str] | None = None) -> int:
    preprocess_dataset(root, workers=min(2, os.cpu_count() or 1), configurations=configurations)
    plan = load_plan(root / "preprocessed")
    checked = 0
    folders = {
        cache_folder(root / "preprocessed", plan.configurations[n])
        for n in configurations or plan.configurations
    }
    for folder in sorted(folders):
        for meta_path in sorted(folder.glob("*.json")):
            case_id = meta_path.stem
            cached = load_cached_case(folder, case_id)
            original = read_landmarks(
                next((root / "landmarks").glob(f"{case_id}.*")),
                geometry=cached.source_geometry,
                names=json.loads(meta_path.read_text())["landmark_names"],
            )
            present = original.present
            back = index_to_world(cached.landmarks_index[present], cached.geometry)
            assert np.abs(back - original.points_mm[present]).max() < 1e-3, case_id
            assert np.allclose(
                world_to_index(original.points_mm[present], cached.geometry),
                cached.landmarks_index[present],
            )
            checked += 1
    return checked


def test_real_datasets_round_trip_through_the_cache(real_datasets: dict[str, Path]) -> None:
    assert _assert_round_trip(real_datasets["isbi2015"], ["2d_coarse"]) == 300  # full res: a copy
    assert _assert_round_trip(real_datasets["hand_xray"]) == 9
    assert _assert_round_trip(real_datasets["afids"]) == 2  # coarse and full resolution


def test_a_landmark_file_deleted_after_planning_stops_preprocess(tmp_path: Path, capfd) -> None:
    """Cached as all-missing, the case would train on empty targets (loss 0, exit 0)."""
    from medlandmark.cli import main
    from medlandmark.datasets.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "ds", num_cases=4, size_px=32)
    plan_dataset(root, gpu_memory_gb=1.0)
    (root / "landmarks" / "case002.csv").unlink()
    assert main(["preprocess", str(root), "-q"]) == 2
    error = capfd.readouterr().err
    assert "landmarks: no landmark file for case(s) case002" in error
    assert not list((root / "preprocessed").glob("data_*/*.npy"))
