"""Every landmark format round-trips (hypothesis), and the Slicer/ISBI variants users have parse right."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from medlandmark.errors import LandmarkFileError
from medlandmark.io.geometry import Geometry, itk_index_to_world, lps_to_ras
from medlandmark.io.landmarks import (
    LandmarkSet,
    read_landmark_table,
    read_landmarks,
    write_landmark_table,
    write_landmarks,
)

from .conftest import shared_path

names_strategy = st.lists(
    st.text("abcdefghijklmnopqrstuvwxyz_0123456789 -", min_size=1, max_size=12)
    .map(str.strip)
    .filter(bool),
    min_size=1,
    max_size=12,
    unique=True,
)
coordinate = st.floats(-1e4, 1e4, allow_nan=False)


@st.composite
def landmark_sets(draw, ndim: int | None = None, allow_missing: bool = True) -> LandmarkSet:
    names = draw(names_strategy)
    ndim = ndim or draw(st.sampled_from([2, 3]))
    points = np.array(
        draw(
            st.lists(
                st.lists(coordinate, min_size=ndim, max_size=ndim),
                min_size=len(names),
                max_size=len(names),
            )
        )
    )
    if allow_missing:
        missing = draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))
        points[np.array(missing)] = np.nan
    return LandmarkSet(names, points)


def _oblique_geometry(ndim: int) -> Geometry:
    direction = (
        Rotation.random(random_state=1).as_matrix()
        if ndim == 3
        else np.array([[0.6, -0.8], [0.8, 0.6]])
    )
    spacing = (3.0, 0.7, 0.45)[:ndim]
    return Geometry(
        spacing, (12.5, -40.0, 7.0)[:ndim], tuple(map(tuple, direction)), (50, 60, 70)[:ndim]
    )


def _assert_same(a: LandmarkSet, b: LandmarkSet, tolerance_mm: float = 1e-6) -> None:
    assert a.names == b.names
    assert np.array_equal(np.isnan(a.points_mm), np.isnan(b.points_mm))
    present = a.present
    assert np.abs(a.points_mm[present] - b.points_mm[present]).max(initial=0.0) < tolerance_mm


@pytest.mark.parametrize("suffix", [".csv", ".json"])
@pytest.mark.parametrize("space", ["LPS", "RAS", "index"])
@given(landmarks=landmark_sets())
def test_our_formats_round_trip(
    tmp_path: Path, suffix: str, space: str, landmarks: LandmarkSet
) -> None:
    geometry = _oblique_geometry(landmarks.ndim)
    path = tmp_path / f"case{suffix}"
    write_landmarks(path, landmarks, geometry=geometry, space=space)
    _assert_same(read_landmarks(path, geometry=geometry), landmarks)


@pytest.mark.parametrize("suffix", [".mrk.json", ".fcsv"])
@pytest.mark.parametrize("space", ["LPS", "RAS"])
@given(landmarks=landmark_sets(ndim=3))
def test_slicer_formats_round_trip(
    tmp_path: Path, suffix: str, space: str, landmarks: LandmarkSet
) -> None:
    path = tmp_path / f"case{suffix}"
    write_landmarks(path, landmarks, space=space)
    _assert_same(read_landmarks(path), landmarks)


@given(landmarks=landmark_sets(ndim=2, allow_missing=False))
def test_isbi_txt_round_trip(tmp_path: Path, landmarks: LandmarkSet) -> None:
    geometry = _oblique_geometry(2)
    path = tmp_path / "001.txt"
    write_landmarks(path, landmarks, geometry=geometry)
    _assert_same(read_landmarks(path, geometry=geometry, names=landmarks.names), landmarks)


@given(
    ndim=st.sampled_from([2, 3]),
    count=st.integers(1, 8),
    cases=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_payer_table_round_trip(
    tmp_path: Path, ndim: int, count: int, cases: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    table = {f"case{i}": rng.uniform(-1e3, 1e3, (count, ndim)) for i in range(cases)}
    table["case0"][0] = np.nan
    path = tmp_path / "all.csv"
    write_landmark_table(path, table)
    back = read_landmark_table(path, ndim)
    assert list(back) == list(table)
    for case_id, points in table.items():
        np.testing.assert_array_equal(back[case_id], points)


def test_json_keeps_confidence_and_recorded_position_of_missing_points(tmp_path: Path) -> None:
    landmarks = LandmarkSet(
        ["a", "b"],
        np.array([[1.0, 2.0, 3.0], [np.nan] * 3]),
        recorded_mm=np.array([[np.nan] * 3, [9.0, 8.0, 7.0]]),
        confidence=np.array([0.9, 0.1]),
    )
    write_landmarks(tmp_path / "c.json", landmarks)
    back = read_landmarks(tmp_path / "c.json")
    assert not back.present[1]
    np.testing.assert_array_equal(back.recorded_mm[1], [9.0, 8.0, 7.0])
    np.testing.assert_allclose(back.confidence, [0.9, 0.1])


def _fcsv(version: str, system: str, xyz: str) -> str:
    return (
        f"# Markups fiducial file version = {version}\n# CoordinateSystem = {system}\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        f"vtkMRMLMarkupsFiducialNode_1,{xyz},0,0,0,1,1,1,0,AC,,\n"
    )


@pytest.mark.parametrize(
    ("version", "system", "is_ras"),
    [
        ("4.6", "0", True),
        ("4.6", "1", False),
        ("4.10", "RAS", True),
        ("4.10", "LPS", False),
        ("4.11", "0", True),
    ],
)
def test_fcsv_coordinate_system_variants(
    tmp_path: Path, version: str, system: str, is_ras: bool
) -> None:
    path = tmp_path / "f.fcsv"
    path.write_text(_fcsv(version, system, "1.5,-2.5,3.5"))
    expected = np.array([[-1.5, 2.5, 3.5]]) if is_ras else np.array([[1.5, -2.5, 3.5]])
    np.testing.assert_array_equal(read_landmarks(path).points_mm, expected)


def test_slicer_json_undefined_point_is_missing_and_ras_is_converted(tmp_path: Path) -> None:
    document = {
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "RAS",
                "controlPoints": [
                    {"label": "A", "position": [1.0, 2.0, 3.0], "positionStatus": "defined"},
                    {"label": "B", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"},
                ],
            }
        ]
    }
    path = tmp_path / "p.mrk.json"
    path.write_text(json.dumps(document))
    landmarks = read_landmarks(path)
    np.testing.assert_array_equal(landmarks.points_mm[0], [-1.0, -2.0, 3.0])
    assert landmarks.present.tolist() == [True, False]


def test_slicer_file_for_a_2d_image_drops_zero_z(tmp_path: Path) -> None:
    landmarks = LandmarkSet(["a"], np.array([[4.0, 5.0]]))
    write_landmarks(tmp_path / "p.mrk.json", landmarks)
    back = read_landmarks(tmp_path / "p.mrk.json", geometry=Geometry.identity((10, 10)))
    np.testing.assert_array_equal(back.points_mm, [[4.0, 5.0]])


def test_isbi_txt_stops_at_classification_lines_and_maps_pixels_to_mm(tmp_path: Path) -> None:
    path = tmp_path / "001.txt"
    path.write_text("10,20\n30,40\n2\n1\n")
    geometry = Geometry.identity((2400, 1935), (0.1, 0.1))
    landmarks = read_landmarks(path, geometry=geometry, names=["s", "n"])
    np.testing.assert_allclose(landmarks.points_mm, [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(
        landmarks.points_mm, itk_index_to_world([[10, 20], [30, 40]], geometry)
    )


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("a.csv", "name,x,y\na,1,2\n", "coordinate_space"),
        ("a.csv", "# coordinate_space: LPS\nname,x,y\na,1,two\n", "not a number"),
        ("a.csv", "# coordinate_space: LPS\nname,x,y\na,1\n", "fields"),
        ("a.csv", "# coordinate_space: LPS\nname,x,y\na,1,2\na,3,4\n", "duplicate"),
        ("a.csv", "# coordinate_space: LPS\nname,x,y\na,1,\n", "some coordinates missing"),
        ("a.json", "{", "invalid JSON"),
        ("a.json", '{"format": "other"}', "not a medlandmark"),
        ("a.mrk.json", '{"markups": []}', "markups"),
        ("a.fcsv", "1,2,3\n", "version"),
        ("a.txt", "hello\n", "no landmarks"),
        ("a.xyz", "", "unknown landmark file type"),
    ],
)
def test_bad_files_give_our_error_naming_the_file(
    tmp_path: Path, name: str, text: str, needle: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LandmarkFileError, match=needle) as raised:
        read_landmarks(path, geometry=Geometry.identity((10, 10)))
    assert str(path) in str(raised.value)


def test_names_select_reorders_and_reports_unknown_and_absent(tmp_path: Path) -> None:
    landmarks = LandmarkSet(["b", "a"], np.array([[1.0, 1.0], [2.0, 2.0]]))
    write_landmarks(tmp_path / "x.json", landmarks)
    assert read_landmarks(tmp_path / "x.json", names=["a", "b"]).points_mm[0].tolist() == [2.0, 2.0]
    with pytest.raises(LandmarkFileError, match="unknown landmark names: b.*not in the file: c"):
        read_landmarks(tmp_path / "x.json", names=["a", "c"])


def test_pixel_files_need_geometry(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("1,2\n")
    with pytest.raises(LandmarkFileError, match="geometry is needed"):
        read_landmarks(tmp_path / "a.txt")


def test_real_afids_rater_files_parse_to_32_points_near_ground_truth() -> None:
    folder = shared_path("afids_mni152")
    truth = read_landmarks(next(folder.glob("*groundtruth*.fcsv")))
    assert len(truth.names) == 32
    for rater in sorted((folder / "raters").glob("*.fcsv")):
        points = read_landmarks(rater).points_mm
        distances = np.linalg.norm(points - truth.points_mm, axis=1)
        assert points.shape == (32, 3)
        assert 0.5 < distances.mean() < 2.5, rater.name  # the human raters' 0.9-1.6 mm


def test_ras_file_and_lps_file_of_same_points_agree(tmp_path: Path) -> None:
    landmarks = LandmarkSet(["a", "b"], np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]]))
    write_landmarks(tmp_path / "ras.fcsv", landmarks, space="RAS")
    text = (tmp_path / "ras.fcsv").read_text()
    assert "-1.0,-2.0,3.0" in text
    np.testing.assert_array_equal(
        lps_to_ras(read_landmarks(tmp_path / "ras.fcsv").points_mm), lps_to_ras(landmarks.points_mm)
    )


@pytest.mark.parametrize("names", [40_000, 20_000], ids=["unknown names", "every name twice"])
def test_a_huge_landmark_file_gets_one_short_answer(tmp_path: Path, names: int) -> None:
    """40 000 rows: one line that names a few of the culprits and counts the rest (the list was
    400 KB long, and repeated names took quadratic time: benchmarks/landmark_reading.py)."""
    path = tmp_path / "many.csv"
    rows = "".join(f"p{i % names},{i % 97}.5,{i % 89}.25\n" for i in range(40_000))
    path.write_text("# coordinate_space: LPS\nname,x,y\n" + rows)
    with pytest.raises(LandmarkFileError) as raised:
        read_landmarks(path).select(["nasion", "sella"], path)
    message = str(raised.value)
    assert len(message) < 300 and "p0, p1" in message and "more" in message
    assert ("39 992 more" if names == 40_000 else "19 992 more") in message


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".csv", "# coordinate_space: LPS\nname,x,y\na,1e308,2\nb,3,4\n"),
        (
            ".json",
            '{"format": "medlandmark.landmarks", "version": 1, "coordinate_space": "LPS", "units": '
            '"mm", "landmarks": [{"name": "a", "position": [1e308, 2]}, '
            '{"name": "b", "position": [3, 4]}]}',
        ),
    ],
)
def test_a_coordinate_beyond_a_kilometre_is_refused(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"points{suffix}"
    path.write_text(text)
    with (
        pytest.raises(LandmarkFileError, match="1e\\+06") as raised,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")  # and no numpy overflow warning on the way
        read_landmarks(path, names=["a", "b"])
    assert raised.value.path == path
