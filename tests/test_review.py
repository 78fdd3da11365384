"""medlandmark review: the session, the API, the pictures' millimetres and the corrected dataset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from medlandmark.datasets.check import check_dataset
from medlandmark.datasets.dataset import Dataset
from medlandmark.datasets.synthetic import make_synthetic_dataset
from medlandmark.errors import MedlandmarkError
from medlandmark.io.geometry import Geometry
from medlandmark.io.images import ImageData, write_image
from medlandmark.io.landmark_formats import CaseVerdict
from medlandmark.io.landmarks import LandmarkSet, read_landmarks, write_landmarks
from medlandmark.review import ReviewSession, create_app, serve
from medlandmark.review.render import image_view, slice_png, slice_view
from medlandmark.review.session import CORRECTIONS_LOG

STATUSES = {"case000": "ok", "case001": "failed", "case002": "doubtful", "case003": None}


def predictions_of(dataset: Path, out: Path) -> Path:
    """Prediction files for the dataset's first cases: the truth moved by 1 mm, a confidence
    per landmark, the first landmark of case003 missing, and a verdict per case."""
    data = Dataset(dataset)
    out.mkdir(parents=True, exist_ok=True)
    for case_id, status in STATUSES.items():
        truth = data.read_landmarks(case_id)
        points = truth.points_mm + 1.0
        if case_id == "case003":
            points[0] = np.nan
        confidence = np.linspace(0.2, 0.9, len(points))
        verdict = None if status is None else CaseVerdict(status, (f"{status} for the test",))
        landmarks = LandmarkSet(truth.names, points, None, confidence, None, verdict)
        write_landmarks(out / f"{case_id}.json", landmarks)
    (out / "summary.csv").write_text("case_id,status\n")
    return out


@pytest.fixture()
def review_2d(tmp_path) -> tuple[ReviewSession, Path, Path]:
    dataset = make_synthetic_dataset(tmp_path / "ds", num_cases=5, size_px=64, spacing_mm=0.5)
    predictions = predictions_of(dataset, tmp_path / "predictions")
    out = tmp_path / "corrected"
    return ReviewSession(predictions, dataset, out, user="tester"), predictions, out


def test_cases_come_failed_and_doubtful_first_and_summary_is_no_case(review_2d) -> None:
    session, _, _ = review_2d
    order = [c.case_id for c in session.cases()]
    assert order == ["case001", "case002", "case003", "case000"]
    assert session.case("case001").reasons == ("failed for the test",)


def test_a_save_writes_a_dataset_that_check_passes_and_logs_the_change(review_2d) -> None:
    session, predictions, out = review_2d
    before = {p.name: p.read_bytes() for p in predictions.iterdir()}
    loaded = session.landmarks("case002")
    points = [None if not np.isfinite(p).all() else list(p) for p in loaded.landmarks.points_mm]
    moved = [points[1][0] + 2.5, points[1][1] - 1.0]
    points[1], points[2] = moved, None
    version = session.save("case002", points, loaded.version)
    saved = read_landmarks(out / "landmarks" / "case002.json")
    assert np.allclose(saved.points_mm[1], moved) and not saved.present[2]
    assert saved.confidence is None and saved.verdict is None  # ground truth, not a prediction
    assert (
        session.landmarks("case002").corrected and session.landmarks("case002").version == version
    )
    assert (out / "images" / "case002.png").is_file()
    assert check_dataset(out).ok
    assert Dataset(out).spec.spacing_mm == [0.5, 0.5]
    entry = json.loads((out / CORRECTIONS_LOG).read_text().splitlines()[-1])
    assert entry["user"] == "tester" and entry["case"] == "case002"
    actions = {c["landmark"]: c for c in entry["changes"]}
    assert actions[saved.names[1]]["distance_mm"] == pytest.approx(np.hypot(2.5, 1.0), abs=1e-3)
    assert actions[saved.names[2]]["action"] == "marked missing"
    assert {p.name: p.read_bytes() for p in predictions.iterdir()} == before


def test_a_stale_version_is_refused_instead_of_losing_an_edit(review_2d) -> None:
    session, _, _ = review_2d
    loaded = session.landmarks("case000")
    points = [list(p) for p in loaded.landmarks.points_mm]
    session.save("case000", points, loaded.version)  # the first tab
    client = TestClient(create_app(session))
    answer = client.put(
        "/api/cases/case000/landmarks", json={"version": loaded.version, "points_mm": points}
    )
    assert answer.status_code == 409 and "another tab" in answer.json()["error"]


def test_the_api_serves_the_page_the_cases_and_a_picture_in_millimetres(review_2d) -> None:
    session, _, _ = review_2d
    client = TestClient(create_app(session))
    assert "review.js" in client.get("/").text
    assert client.get("/static/review.js").status_code == 200
    cases = client.get("/api/cases").json()["cases"]
    assert [c["case_id"] for c in cases][0] == "case001"
    case = client.get("/api/cases/case003").json()
    assert case["points_mm"][0] is None and case["ndim"] == 2
    assert case["view"]["width"] == 64 and case["view"]["column_mm"] == [0.5, 0.0]
    picture = client.get("/api/cases/case003/picture.png", params={"low": 0, "high": 255})
    assert picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size == (64, 64)
    saved = client.put(
        "/api/cases/case003/landmarks",
        json={"version": case["version"], "points_mm": [[1.0, 2.0]] + case["points_mm"][1:]},
    )
    assert saved.status_code == 200
    assert np.allclose(session.landmarks("case003").landmarks.points_mm[0], [1.0, 2.0])


@pytest.mark.parametrize(
    "url",
    [
        "/static/..%2Fsession.py",
        "/static/%2Fetc%2Fpasswd",
        "/static/session.py",
        "/api/cases/..%2F..%2Fds%2Fdataset",
        "/api/cases/%2Fetc%2Fpasswd",
        "/api/cases/summary",
        "/api/cases/case009",
    ],
)
def test_requests_reach_nothing_outside_the_cases_and_static_files(review_2d, url) -> None:
    session, _, _ = review_2d
    assert TestClient(create_app(session)).get(url).status_code == 404


def test_a_symlinked_prediction_is_read_but_never_written_through(review_2d, tmp_path) -> None:
    session, predictions, out = review_2d
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((predictions / "case000.json").read_bytes())
    (predictions / "case000.json").unlink()
    (predictions / "case000.json").symlink_to(outside)
    session = ReviewSession(predictions, session.images_root, out, user="tester")
    before = outside.read_bytes()
    loaded = session.landmarks("case000")
    session.save("case000", [list(p) for p in loaded.landmarks.points_mm], loaded.version)
    assert outside.read_bytes() == before and (out / "landmarks" / "case000.json").is_file()


def test_bad_bodies_and_points_get_a_clear_error(review_2d) -> None:
    session, _, _ = review_2d
    client = TestClient(create_app(session))
    version = session.landmarks("case000").version
    assert client.put("/api/cases/case000/landmarks", content=b"{").status_code == 400
    answer = client.put(
        "/api/cases/case000/landmarks", json={"version": version, "points_mm": [[1.0]]}
    )
    assert answer.status_code == 400 and "expected" in answer.json()["error"]
    assert client.get("/api/cases/case000/slices", params={"point": "1,2,3"}).status_code == 400


def test_review_refuses_to_write_into_its_predictions_and_to_listen_abroad(review_2d) -> None:
    session, predictions, _ = review_2d
    with pytest.raises(MedlandmarkError, match="never overwritten"):
        ReviewSession(predictions, session.images_root, predictions)
    with pytest.raises(MedlandmarkError, match="--allow-remote"):
        serve(session, host="0.0.0.0", open_browser=False)


def volume(tmp_path: Path) -> tuple[Path, Geometry, np.ndarray]:
    """A volume turned and anisotropic, one bright voxel, and that voxel's world position."""
    turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    geometry = Geometry((2.0, 1.0, 1.5), (10.0, -20.0, 5.0), turn, (20, 30, 24))
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 30, 24)], indexing="ij")
    ellipsoid = sum(g**2 for g in grid) < 0.8  # something to see on the slices
    array = (300.0 * ellipsoid)[None].astype(np.float32)
    array[0, 7, 11, 13] = 1000.0
    bright = np.asarray(geometry.origin_mm) + geometry.index_to_world_matrix @ [7, 11, 13]
    path = tmp_path / "images" / "vol.nii.gz"
    path.parent.mkdir(parents=True)
    write_image(path, array, geometry)
    return path, geometry, bright


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_a_slice_is_drawn_where_its_view_says_in_world_millimetres(tmp_path, plane) -> None:
    path, geometry, bright = volume(tmp_path)
    view = slice_view(geometry, plane, bright)
    image = ImageData(np.zeros((1, *geometry.shape), np.float32), geometry)
    image.array[0, 7, 11, 13] = 1000.0
    pixels = np.asarray(Image.open(io.BytesIO(slice_png(image, view, (0.0, 1000.0)))))
    row, column = np.unravel_index(np.argmax(pixels), pixels.shape)
    assert pixels.shape == (view.height, view.width)
    assert np.allclose(view.world(column, row), bright, atol=1.01 * np.linalg.norm(view.column_mm))


def test_the_view_of_a_2d_image_maps_pixels_to_world() -> None:
    geometry = Geometry((0.2, 0.1), (5.0, 7.0), ((0.0, 1.0), (1.0, 0.0)), (40, 60))
    view = image_view(geometry)
    assert (view.width, view.height) == (60, 40)
    assert np.allclose(view.world(3, 2), [5.0 + 3 * 0.1, 7.0 + 2 * 0.2])


def test_a_3d_case_has_slices_through_a_point(tmp_path) -> None:
    path, geometry, bright = volume(tmp_path)
    names = ["A", "B", "C", "D"]
    points = np.stack([bright, bright + 3, bright - 3, bright + [0, 0, 4]])
    write_landmarks(tmp_path / "predictions" / "vol.mrk.json", LandmarkSet(names, points))
    session = ReviewSession(tmp_path / "predictions", tmp_path / "images", tmp_path / "out")
    client = TestClient(create_app(session))
    case = client.get("/api/cases/vol").json()
    assert case["ndim"] == 3 and case["view"] is None
    point = ",".join(str(v) for v in bright)
    views = client.get("/api/cases/vol/slices", params={"point": point}).json()
    assert set(views) == {"axial", "coronal", "sagittal"}
    picture = client.get("/api/cases/vol/picture.png", params={"plane": "coronal", "point": point})
    assert Image.open(io.BytesIO(picture.content)).size == (
        views["coronal"]["width"],
        views["coronal"]["height"],
    )
    moved = [[bright[0] + 1.5, bright[1], bright[2]]] + case["points_mm"][1:]
    client.put("/api/cases/vol/landmarks", json={"version": case["version"], "points_mm": moved})
    saved = read_landmarks(tmp_path / "out" / "landmarks" / "vol.json")
    assert np.allclose(saved.points_mm[0], moved[0])
    assert (tmp_path / "out" / "images" / "vol.nii.gz").is_file()
    assert check_dataset(tmp_path / "out").ok


def test_a_folder_corrected_through_the_app_trains_from_another_run(tmp_path) -> None:
    from medlandmark.cli import main
    from medlandmark.training.loop import TrainOptions, train

    from .conftest import synthetic_training_set

    source = synthetic_training_set(tmp_path / "source", num_cases=8, size_px=48)
    run = tmp_path / "run"
    train(source, run, TrainOptions(epochs=1, iterations_per_epoch=1, seed=0))
    predictions = predictions_of(source, tmp_path / "predictions")
    out = tmp_path / "corrected"
    client = TestClient(create_app(ReviewSession(predictions, source, out)))
    for listed in client.get("/api/cases").json()["cases"]:
        case = client.get(f"/api/cases/{listed['case_id']}").json()
        points = [None if p is None else [p[0] - 1.0, p[1] - 1.0] for p in case["points_mm"]]
        body = {"version": case["version"], "points_mm": points}
        assert client.put(f"/api/cases/{listed['case_id']}/landmarks", json=body).status_code == 200
    assert check_dataset(out).ok and len(Dataset(out).case_ids) == len(STATUSES)
    assert main(["plan", str(out), "--plans-from", str(run), "-q"]) == 0
    assert main(["preprocess", str(out), "--workers", "1", "-q"]) == 0
    options = TrainOptions(epochs=1, iterations_per_epoch=1, fold="all", init_from=str(run))
    assert train(out, tmp_path / "tuned", options).status == "finished"


def test_a_metaimage_case_is_saved_with_its_data_file(tmp_path) -> None:
    geometry = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3), (8, 9, 10))
    write_image(tmp_path / "images" / "mha.mhd", np.ones((1, 8, 9, 10), np.float32), geometry)
    names, points = ["A", "B", "C", "D"], np.array([[1.0, 2, 3], [2, 3, 4], [3, 2, 5], [4, 4, 4]])
    write_landmarks(tmp_path / "predictions" / "mha.json", LandmarkSet(names, points))
    session = ReviewSession(tmp_path / "predictions", tmp_path / "images", tmp_path / "out")
    loaded = session.landmarks("mha")
    session.save("mha", [list(p) for p in points], loaded.version)
    assert check_dataset(tmp_path / "out").ok
    assert len(list((tmp_path / "out" / "images").iterdir())) == 2  # header and data
