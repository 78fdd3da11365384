"""Prediction: geometry exact through preprocessing and the cascade, robust batches, formats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from torch import nn

from medlandmark.datasets.dataset import DatasetSpec, write_spec
from medlandmark.inference.batch import PredictOptions, predict_files
from medlandmark.inference.predictor import Predictor, fine_window, swap_channels
from medlandmark.io.geometry import Geometry, index_to_world
from medlandmark.io.images import read_image, write_image
from medlandmark.io.landmarks import LandmarkSet, read_landmarks, write_landmarks
from medlandmark.planning import plan_dataset
from medlandmark.records.run import RunRecord, read_run_record, write_run_record
from medlandmark.shape_model import ShapeModel

BLOB_SIGMA_MM = 4.0


class PeakIsTheImage(nn.Module):
    """A stand-in network whose heatmap is its input: a blob image decodes to the blob."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[:, :1]]


def _blob_volume(geometry: Geometry, point_mm: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), axis=-1)
    world = index_to_world(grid.reshape(-1, geometry.ndim), geometry)
    return 1000 * np.exp(-np.sum((world - point_mm) ** 2, axis=1) / (2 * BLOB_SIGMA_MM**2)).reshape(
        geometry.shape
    )


def _blob_model(
    tmp_path: Path, gpu_memory_gb: float, shape=(30, 80, 90), spacing=(3.5, 1.1, 1.0)
) -> tuple[Path, Path, np.ndarray]:
    """A one-landmark 3D dataset of oblique, anisotropic blob volumes (MR: a CT clip would
    flatten the blob) whose thick first array axis runs near world x, planned (reoriented, which
    makes it the last axis, then transposed first again), and a model
    folder of runs (one per configuration) whose network is the identity."""
    dataset = tmp_path / "ds"
    direction = Rotation.from_euler("xyz", [0.3, -0.2, 0.25]).as_matrix()
    geometry = Geometry(spacing, (-30.0, 12.0, 5.0), tuple(map(tuple, direction)), shape)
    points = []
    for case in range(3):
        point = index_to_world(np.array([12.3 + case, 50.0 - 4 * case, 20.0 + 9 * case]), geometry)
        write_image(
            dataset / "images" / f"c{case}.nii.gz",
            _blob_volume(geometry, point).astype(np.float32),
            geometry,
        )
        write_landmarks(dataset / "landmarks" / f"c{case}.json", LandmarkSet(["tip"], point[None]))
        points.append(point)
    write_spec(
        dataset, DatasetSpec(name="blob", spatial_dims=3, landmarks=["tip"], modalities=["mr"])
    )
    plan = plan_dataset(dataset, gpu_memory_gb=gpu_memory_gb)
    models = tmp_path / "models"
    for name in plan.configurations:
        run = models / name
        run.mkdir(parents=True)
        write_run_record(
            run,
            RunRecord(
                arch="unet",
                configuration=name,
                plan=plan,
                landmarks=["tip"],
                presence_threshold=0.2,
            ),
        )
    return dataset, models, np.array(points)


def _identity_factory(record: dict, folder: Path) -> nn.Module:
    return PeakIsTheImage()


@pytest.fixture(scope="module")
def cascade_blobs(tmp_path_factory):
    return _blob_model(tmp_path_factory.mktemp("cascade"), gpu_memory_gb=0.9)


def test_single_stage_prediction_is_exact_in_world_mm(tmp_path: Path) -> None:
    dataset, models, points = _blob_model(tmp_path, gpu_memory_gb=24.0)
    runs = sorted(p for p in models.iterdir())
    assert len(runs) == 1  # the whole volume fits one patch: no cascade
    plan = read_run_record(runs[0]).plan
    assert plan.reorient and plan.transpose_forward == [
        2,
        0,
        1,
    ]  # both moves on the way in and back
    predictor = Predictor.from_run(runs[0], network_factory=_identity_factory)
    for case, point in enumerate(points):
        prediction = predictor.predict(dataset / "images" / f"c{case}.nii.gz")
        assert prediction.present.all()
        assert np.linalg.norm(prediction.landmarks.points_mm[0] - point) < 0.05


def test_cascade_refines_at_full_resolution_and_stays_exact(cascade_blobs) -> None:
    dataset, models, points = cascade_blobs
    names = sorted(p.name for p in models.iterdir())
    assert any(n.endswith("_coarse") for n in names) and any(n.endswith("_fine") for n in names)
    coarse_only = Predictor.from_run(
        models / next(n for n in names if n.endswith("_coarse")), network_factory=_identity_factory
    )
    for name in names:
        if not name.endswith(("_coarse", "_fine")):
            (models / name / "run.json").rename(
                models / name / "run.json.off"
            )  # keep the cascade alone
    cascade = Predictor.from_run(models, network_factory=_identity_factory)
    assert len(cascade.stages) == 2 and cascade.stages[0].configuration.stage == "coarse"
    for case, point in enumerate(points):
        image = read_image(dataset / "images" / f"c{case}.nii.gz")
        fine = np.linalg.norm(cascade.predict(image).landmarks.points_mm[0] - point)
        coarse = np.linalg.norm(coarse_only.predict(image).landmarks.points_mm[0] - point)
        assert fine < 0.05, (case, fine, coarse)


class TurnsEveryWindow:
    """A stand-in shape model whose every fit asks for windows turned by one fixed rotation."""

    minimum_points = 8

    def __init__(self, direction: np.ndarray) -> None:
        self.direction = direction

    def expected(self, points_mm: np.ndarray, usable: np.ndarray) -> None:
        return None  # one landmark: no fit, the verdict says so

    def window_direction(self, fit) -> np.ndarray:
        return self.direction


def test_fine_windows_turned_to_the_anatomy_stay_exact_in_world_mm(cascade_blobs) -> None:
    dataset, models, points = cascade_blobs
    for name in (p.name for p in models.iterdir()):
        record = models / name / "run.json"
        if not name.endswith(("_coarse", "_fine")) and record.is_file():
            record.rename(models / name / "run.json.off")  # keep the cascade alone
    turned = Predictor.from_run(
        models, network_factory=_identity_factory, shape_check=False, window_orientation="anatomy"
    )
    fine_geometry = Rotation.from_euler("zyx", [35, -25, 50], degrees=True).as_matrix()
    turned.stages[0].shape_model = TurnsEveryWindow(fine_geometry)
    for case, point in enumerate(points):
        image = read_image(dataset / "images" / f"c{case}.nii.gz")
        error = np.linalg.norm(turned.predict(image).landmarks.points_mm[0] - point)
        assert error < 0.1, (case, error)


def test_a_fine_window_turned_or_not_holds_the_same_voxels_where_their_grids_meet() -> None:
    geometry = Geometry(
        (1.0, 1.0, 1.0), (5.0, -3.0, 2.0), tuple(map(tuple, np.eye(3))), (20, 22, 24)
    )
    array = np.random.default_rng(0).normal(size=(1, *geometry.shape)).astype(np.float32)
    patch = np.array([6, 6, 6])
    near = index_to_world(np.array([9.2, 11.2, 12.2]), geometry)
    straight, _ = fine_window(array, geometry, near, patch)
    assert np.array_equal(straight, array[:, 7:13, 9:15, 10:16])  # whole voxels, nearest start
    centre = index_to_world(np.array([9.5, 11.5, 12.5]), geometry)
    quarter = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])  # a quarter turn of axes 1, 2
    turned, turned_geometry = fine_window(array, geometry, centre, patch, quarter)
    assert np.allclose(turned_geometry.direction_matrix, quarter)
    assert np.allclose(index_to_world(np.full(3, 2.5), turned_geometry), centre)
    # a quarter turn about a point between voxels maps voxel centres to voxel centres
    straight, _ = fine_window(array, geometry, centre, patch)
    assert np.allclose(turned[0], np.rot90(straight[0], k=-1, axes=(1, 2)), atol=1e-6)
    outside, _ = fine_window(array, geometry, centre + 100.0, patch, quarter)
    assert not outside.any()  # zero, the normalised mean, beyond the array


def test_absent_landmark_is_reported_missing_with_its_position_kept(tmp_path: Path) -> None:
    dataset, models, _ = _blob_model(tmp_path, gpu_memory_gb=24.0)
    run = next(models.iterdir())
    geometry = read_image(dataset / "images" / "c0.nii.gz").geometry
    write_image(tmp_path / "empty.nii.gz", np.zeros(geometry.shape, np.float32) + 5.0, geometry)
    prediction = Predictor.from_run(run, network_factory=_identity_factory).predict(
        tmp_path / "empty.nii.gz"
    )
    assert not prediction.present[0]
    assert (
        np.isnan(prediction.landmarks.points_mm[0]).all()
        and not np.isnan(prediction.landmarks.recorded_mm[0]).any()
    )


def test_swap_channels_exchanges_pairs_only() -> None:
    heatmaps = torch.arange(4.0)[:, None, None].expand(4, 2, 2)
    swapped = swap_channels(heatmaps, [(0, 2)])
    assert swapped[:, 0, 0].tolist() == [2.0, 1.0, 0.0, 3.0]


def _real_model(tmp_path: Path) -> tuple[Path, Path]:
    """A real (briefly trained) U-Net on 2D synthetic images, with its dataset."""
    from medlandmark.training.loop import TrainOptions, train

    from .conftest import synthetic_training_set

    dataset = synthetic_training_set(tmp_path / "ds", num_cases=6, size_px=48)
    train(dataset, tmp_path / "run", TrainOptions(epochs=1, iterations_per_epoch=3, fold="all"))
    return dataset, tmp_path / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _real_model(tmp_path_factory.mktemp("trained"))


@pytest.mark.parametrize("output_format", ["csv", "json", "mrk.json", "fcsv"])
def test_every_output_format_reads_back(trained, tmp_path: Path, output_format: str) -> None:
    dataset, run = trained
    rows = predict_files(
        run, [dataset / "images" / "case000.png"], tmp_path / "out", PredictOptions(output_format)
    )
    assert rows[0]["status"] == "ok"
    written = tmp_path / "out" / rows[0]["landmark_file"]
    back = read_landmarks(
        written,
        geometry=read_image(dataset / "images" / "case000.png", spacing_xy_mm=(1, 1)).geometry,
    )
    reference = Predictor.from_run(run).predict(dataset / "images" / "case000.png").landmarks
    assert back.names == reference.names
    np.testing.assert_allclose(back.points_mm, reference.points_mm, atol=1e-6)


def test_a_broken_image_fails_alone_and_the_exit_code_says_so(trained, tmp_path: Path) -> None:
    dataset, run = trained
    broken = tmp_path / "inputs" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlandmark",
            "predict",
            str(run),
            str(dataset / "images" / "case001.png"),
            str(broken),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    summary = (tmp_path / "out" / "summary.csv").read_text()
    assert "case001,ok" in summary and "broken,failed" in summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case001.json", "summary.csv"]


def test_fold_ensemble_of_identical_runs_equals_one_run(trained, tmp_path: Path) -> None:
    import shutil

    dataset, run = trained
    for fold in ("fold0", "fold1"):
        shutil.copytree(run, tmp_path / "ensemble" / fold)
    one = Predictor.from_run(run).predict(dataset / "images" / "case002.png")
    two = Predictor.from_run(tmp_path / "ensemble").predict(dataset / "images" / "case002.png")
    np.testing.assert_allclose(one.peak, two.peak, rtol=1e-5)
    np.testing.assert_array_equal(one.present, two.present)
    kept = lambda p: np.where(p.present[:, None], p.landmarks.points_mm, p.landmarks.recorded_mm)  # noqa: E731
    np.testing.assert_allclose(kept(one), kept(two), atol=1e-5)


def test_end_to_end_on_real_isbi_train_predict_evaluate(small_isbi: Path, tmp_path: Path) -> None:
    """Train briefly on six ISBI 2015 images, predict two others, evaluate in mm."""
    from medlandmark.datasets.converters import convert_isbi2015
    from medlandmark.evaluation import evaluate
    from medlandmark.training.loop import TrainOptions, train

    from .conftest import shared_path

    train(
        small_isbi,
        tmp_path / "run",
        TrainOptions(configuration="2d_coarse", epochs=1, iterations_per_epoch=6, fold="all"),
    )
    truth = convert_isbi2015(shared_path("isbi2015"), tmp_path / "truth")
    images = [truth / "images" / f"{case}.jpg" for case in ("151", "152")]
    rows = predict_files(tmp_path / "run", images, tmp_path / "pred")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    metrics = evaluate(tmp_path / "pred", truth, tmp_path / "eval")
    assert metrics["n_cases"] == 2 and metrics["missing"]["tp"] == 0
    assert metrics["n_points"] + metrics["missing"]["fp"] == 38
    assert metrics["mre_mm"] is None or np.isfinite(metrics["mre_mm"])


def test_predictor_runs_from_the_exported_onnx_file(trained, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from medlandmark.cli import main

    dataset, run = trained
    assert main(["export", str(run), "--onnx", str(tmp_path / "model.onnx")]) == 0
    image = dataset / "images" / "case003.png"
    torch_prediction = Predictor.from_run(run).predict(image)
    onnx_prediction = Predictor.from_run(run, onnx=tmp_path / "model.onnx").predict(image)
    np.testing.assert_array_equal(torch_prediction.present, onnx_prediction.present)
    kept = lambda p: np.where(p.present[:, None], p.landmarks.points_mm, p.landmarks.recorded_mm)  # noqa: E731
    np.testing.assert_allclose(kept(torch_prediction), kept(onnx_prediction), atol=1e-3)


def test_spread_measures_the_heatmap_width_in_mm(tmp_path: Path) -> None:
    dataset, models, _ = _blob_model(tmp_path, gpu_memory_gb=24.0)
    prediction = Predictor.from_run(
        next(models.iterdir()), network_factory=_identity_factory
    ).predict(dataset / "images" / "c1.nii.gz")
    assert (
        3.0 < prediction.spread_mm[0] < 5.0
    )  # the blob's sigma is 4 mm (anisotropic voxels averaged)


def test_overlay_option_writes_a_png_per_case(trained, tmp_path: Path) -> None:
    dataset, run = trained
    rows = predict_files(
        run, [dataset / "images" / "case004.png"], tmp_path / "out", PredictOptions(overlay=True)
    )
    assert rows[0]["status"] == "ok"
    assert (tmp_path / "out" / "overlays" / "case004.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _CutsEverything:
    """A shape model stand-in that expects every landmark far outside the image (the field of
    view has cut them all off) and records what it was given."""

    minimum_points, handedness, rotation_limit_deg, inlier_mm = 1, 0, None, 3.0
    mirrors, turns_too_far = ShapeModel.mirrors, ShapeModel.turns_too_far
    plausible = ShapeModel.plausible

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def expected(self, points_mm: np.ndarray, usable: np.ndarray, seed: int = 0):
        from medlandmark.shape_model import ExpectedFit

        self.calls.append((points_mm.copy(), usable.copy()))
        return ExpectedFit(points_mm + 1e4, np.flatnonzero(usable), 0.5)


def test_the_shape_check_reports_cut_off_landmarks_missing_in_the_image_geometry(
    tmp_path: Path,
) -> None:
    dataset, models, points = _blob_model(tmp_path, gpu_memory_gb=24.0)
    run = next(models.iterdir())
    image = read_image(dataset / "images" / "c0.nii.gz")
    shape = _CutsEverything()
    predictor = Predictor.from_run(run, network_factory=_identity_factory)
    assert predictor.stages[0].shape_model is None  # a run.json without one (older runs)
    predictor.stages[0].shape_model = shape
    prediction = predictor.predict(image)
    assert (
        not prediction.present[0]
        and np.linalg.norm(prediction.landmarks.recorded_mm[0] - points[0]) < 0.05
    )
    found, usable = shape.calls[0]  # world mm of the image as given
    assert usable.tolist() == [True] and np.linalg.norm(found[0] - points[0]) < 0.05
    unchecked = Predictor.from_run(run, network_factory=_identity_factory, shape_check=False)
    unchecked.stages[0].shape_model = shape
    assert unchecked.predict(image).present[0]


def test_a_landmark_found_outside_the_image_is_reported_missing(tmp_path: Path) -> None:
    """A point beyond the image's box (a fine patch's zero padding can put a peak there) is not
    in this image, whatever its confidence; a point on the last voxel is."""
    dataset, models, points = _blob_model(tmp_path, gpu_memory_gb=24.0)
    run = next(models.iterdir())
    image = read_image(dataset / "images" / "c0.nii.gz")
    predictor = Predictor.from_run(run, network_factory=_identity_factory, shape_check=False)
    found = predictor.predict(image)
    assert found.present[0]
    last = np.array(image.geometry.shape, dtype=np.float64) - 1.0
    for beyond_voxels, present in [(0.0, True), (0.4, True), (3.0, False)]:
        first = predictor._first_pass(image, mirror=False)
        first.points_mm[0] = index_to_world(last + beyond_voxels, image.geometry)
        assert predictor._predict(image, first).present[0] == present, beyond_voxels


class _PlacesItElsewhere:
    """A shape model stand-in: nothing cut off, and the landmark expected ``offset_mm`` from
    where it was found (as when the network's peak sits on a look-alike)."""

    inlier_mm, minimum_points, handedness, rotation_limit_deg = 3.0, 1, 0, None
    typical_orientation = None  # fine windows keep the image's axes
    mirrors, turns_too_far = ShapeModel.mirrors, ShapeModel.turns_too_far
    plausible, window_direction = ShapeModel.plausible, ShapeModel.window_direction

    def __init__(self, offset_mm: np.ndarray) -> None:
        self.offset_mm = offset_mm

    def cut_off(self, points_mm, usable, geometry) -> np.ndarray:
        return np.zeros(len(points_mm), dtype=bool)

    def expected(self, points_mm, usable, seed: int = 0):
        from medlandmark.shape_model import ExpectedFit

        return ExpectedFit(points_mm + self.offset_mm, np.flatnonzero(usable), 0.5)


def _guided(predictor: Predictor, offset_mm: np.ndarray) -> Predictor:
    predictor.stages[0].shape_model = _PlacesItElsewhere(offset_mm)
    return predictor


def test_a_landmark_far_from_its_expected_place_takes_the_peak_there(
    tmp_path: Path, cascade_blobs
) -> None:
    """The blob is the only peak; expected 15 mm away, the landmark moves to the edge of the
    allowed neighbourhood nearest the blob (single stage: on its heatmaps; cascade: in a fine
    patch centred on the expected place)."""
    offset = np.array([9.0, -12.0, 0.0])
    dataset, models, points = _blob_model(tmp_path, gpu_memory_gb=24.0)
    single = _guided(
        Predictor.from_run(next(models.iterdir()), network_factory=_identity_factory), offset
    )
    geometry = single.stages[0].configuration.spacing_mm
    radius = max(3.0, 2 * max(geometry))
    found = single.predict(dataset / "images" / "c0.nii.gz").landmarks.points_mm[0]
    assert np.linalg.norm(found - (points[0] + offset)) <= radius + 0.5
    assert np.linalg.norm(found - points[0]) < 15.0 - radius + 2.0  # pulled toward the blob
    cascade_dataset, cascade_models, cascade_points = cascade_blobs
    names = sorted(
        p.name for p in cascade_models.iterdir() if p.name.endswith(("_coarse", "_fine"))
    )
    folder = tmp_path / "cascade"
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "run.json").write_text((cascade_models / name / "run.json").read_text())
    cascade = _guided(Predictor.from_run(folder, network_factory=_identity_factory), offset)
    fine_spacing = cascade.stages[1].configuration.spacing_mm
    found = cascade.predict(cascade_dataset / "images" / "c0.nii.gz").landmarks.points_mm[0]
    assert (
        np.linalg.norm(found - (cascade_points[0] + offset))
        <= max(3.0, 2 * max(fine_spacing)) + 0.5
    )
    unguided = Predictor.from_run(folder, network_factory=_identity_factory)
    unguided.stages[0].shape_model = _PlacesItElsewhere(
        np.zeros(3)
    )  # found where expected: untouched
    assert (
        np.linalg.norm(
            unguided.predict(cascade_dataset / "images" / "c0.nii.gz").landmarks.points_mm[0]
            - cascade_points[0]
        )
        < 0.05
    )
