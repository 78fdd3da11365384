"""Fuzzing every landmark reader and the dataset.json / splits.json loaders: whatever the bytes,
the result is a parsed value or our own error (a MedlandmarkError), never another exception.

Raw random bytes rarely get past the first check, so most strategies start from a valid file
and mutate it (bytes flipped, inserted, deleted; lines dropped, repeated, swapped; fields
replaced by awkward tokens), or build files line by line from a vocabulary of tokens.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medlandmark.datasets.dataset import (
    Dataset,
    DatasetSpec,
    load_spec,
    read_splits_file,
    write_spec,
)
from medlandmark.errors import MedlandmarkError
from medlandmark.io import landmark_formats as fmt
from medlandmark.io.geometry import Geometry
from medlandmark.io.landmarks import (
    LandmarkSet,
    read_landmark_table,
    read_landmarks,
    write_landmark_table,
    write_landmarks,
)

# MEDLANDMARK_FUZZ_EXAMPLES=5000 for a longer hunt; 200 keeps the file to about half a minute
EXAMPLES = settings(
    max_examples=int(os.environ.get("MEDLANDMARK_FUZZ_EXAMPLES", 200)), deadline=None
)
NAMES = ["A", "B", "C"]
GEOMETRIES = {
    2: Geometry((0.5, 0.25), (1.0, -2.0), ((0.6, -0.8), (0.8, 0.6)), (40, 30)),
    3: Geometry.identity((10, 12, 14), (2.0, 1.0, 1.0)),
}
SUFFIXES = [".csv", ".json", ".mrk.json", ".fcsv", ".txt"]
AWKWARD_TOKENS = [
    "",
    " ",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e999",
    "-0",
    "0x10",
    "1_000",
    "１２",
    "\x00",
    "\u2028",
    "null",
    "true",
    "[]",
    "{}",
    '"',
    "'",
    ",",
    "#",
    "# coordinate_space: RAS",
    "LPS",
    "index",
    "9" * 400,
    "-1e-320",
    "name",
    "x",
    "y",
    "z",
    "label",
    "\r",
    "\t",
    "é",
    "\ufeff",
]
SCRATCH = Path(tempfile.mkdtemp(prefix="medlandmark-fuzz-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)


def _valid_files() -> dict[str, bytes]:
    """One valid file per format (3D points, one missing), as bytes."""
    points = np.array([[1.5, -2.0, 3.25], [np.nan] * 3, [0.0, 4.0, -1.0]])
    landmarks = LandmarkSet(NAMES, points, confidence=np.array([0.9, 0.1, 0.5]))
    files = {}
    for suffix in SUFFIXES:
        path = SCRATCH / f"valid{suffix}"
        if suffix == ".txt":  # ISBI: 2D pixels, every point present
            path.write_text("10,12\n3,4\n7,8\n1\n2\n")
        else:
            write_landmarks(
                path, landmarks, GEOMETRIES[3], space="RAS" if suffix == ".fcsv" else "LPS"
            )
        files[suffix] = path.read_bytes()
    table = SCRATCH / "table.csv"
    write_landmark_table(table, {"c1": np.arange(6.0).reshape(3, 2), "c2": np.ones((3, 2))})
    files["table"] = table.read_bytes()
    return files


VALID = _valid_files()


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` with a few random edits: bytes flipped, inserted or deleted, lines dropped,
    repeated or swapped, fields replaced by awkward tokens."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "line", "token"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "line":
            lines = bytes(data).split(b"\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            action = draw(st.sampled_from(["drop", "repeat", "swap"]))
            if action == "drop":
                del lines[i]
            elif action == "repeat":
                lines.insert(i, lines[j])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            data = bytearray(b"\n".join(lines))
        else:
            text = bytes(data).decode("utf-8", "replace")
            separators = [i for i, c in enumerate(text) if c in ',:[]{}"\n=']
            if len(separators) >= 2:
                k = draw(st.integers(0, len(separators) - 2))
                start, end = separators[k] + 1, separators[k + 1]
                text = text[:start] + draw(st.sampled_from(AWKWARD_TOKENS)) + text[end:]
            data = bytearray(text.encode("utf-8"))
    return bytes(data)


def _token_lines(separator: str = ",") -> st.SearchStrategy[str]:
    token = st.one_of(
        st.sampled_from(AWKWARD_TOKENS + NAMES),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(-(10**20), 10**20).map(str),
        st.text(max_size=6),
    )
    line = st.lists(token, max_size=6).map(separator.join)
    header = st.sampled_from(
        [
            "# coordinate_space: LPS",
            "# coordinate_space: index",
            "name,x,y,z",
            "name,x,y",
            "name,x,y,z,confidence",
            "# Markups fiducial file version = 4.11",
            "# CoordinateSystem = 0",
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
            "id,x1,y1",
        ]
    )
    return st.lists(st.one_of(header, line), max_size=12).map("\n".join)


def _write(name: str, data: bytes) -> Path:
    path = SCRATCH / name
    path.write_bytes(data)
    return path


def _read_every_way(path: Path) -> None:
    """Read ``path`` as a user's files are read: with and without geometry, names and ndim."""
    for geometry, names, ndim in (
        (None, None, None),
        (GEOMETRIES[2], NAMES, None),
        (GEOMETRIES[3], None, None),
        (None, NAMES, 3),
        (GEOMETRIES[3], NAMES, None),
    ):
        try:
            landmarks = read_landmarks(path, geometry=geometry, names=names, ndim=ndim)
        except MedlandmarkError:
            continue
        assert landmarks.points_mm.shape == (len(landmarks.names), landmarks.ndim)
        assert not np.isinf(landmarks.points_mm).any()
        if names is not None:
            assert landmarks.names == names


# --- landmark files ---------------------------------------------------------------------------

HUGE_INT = "9" * 400  # beyond the float range
FOUND_BY_FUZZING = {
    "huge_int_position.json": '{"format": "medlandmark.landmarks", "coordinate_space": "LPS", '
    f'"landmarks": [{{"name": "A", "position": [{HUGE_INT}, 1, 2]}}]}}',
    "5000_digits.json": '{"format": "medlandmark.landmarks", "landmarks": [' + "9" * 5000 + "]}",
    "huge_int_position.mrk.json": f'{{"markups": [{{"controlPoints": [{{"position": [{HUGE_INT}, 1, 2]}}]}}]}}',
    "units_not_a_string.mrk.json": '{"markups": [{"coordinateUnits": [], "controlPoints": []}]}',
    "field_beyond_csv_limit.csv": "# coordinate_space: LPS\nname,x,y\nA," + "1" * 200_000 + ",2\n",
    "index_overflowing_mm.csv": "# coordinate_space: index\nname,x,y,z\nA,1,1,1.7e308\n",
}


@pytest.mark.parametrize("name", FOUND_BY_FUZZING)
def test_inputs_found_by_fuzzing_give_our_error(name: str) -> None:
    path = _write(name, FOUND_BY_FUZZING[name].encode())
    with pytest.raises(MedlandmarkError) as raised:
        read_landmarks(path, geometry=GEOMETRIES[3])
    assert raised.value.path == path


def test_table_with_a_bare_carriage_return_gives_our_error() -> None:
    with pytest.raises(MedlandmarkError):
        read_landmark_table(_write("cr.csv", b"\r\x00"), 2)


def test_dataset_json_with_a_5000_digit_number_gives_our_error() -> None:
    with pytest.raises(MedlandmarkError, match="invalid JSON"):
        _load_spec_from(
            b'{"name": "x", "spatial_dims": 2, "landmarks": ["a"], "spacing_mm": ['
            + b"9" * 5000
            + b"]}",
            strict=True,
        )


@pytest.mark.parametrize("suffix", SUFFIXES)
@EXAMPLES
@given(data=st.data())
def test_any_bytes_read_or_our_error(suffix: str, data) -> None:
    _read_every_way(_write(f"raw{suffix}", data.draw(st.binary(max_size=600))))


@pytest.mark.parametrize("suffix", SUFFIXES)
@EXAMPLES
@given(data=st.data())
def test_mutated_valid_file_reads_or_our_error(suffix: str, data) -> None:
    _read_every_way(_write(f"mutated{suffix}", data.draw(mutated(VALID[suffix]))))


@pytest.mark.parametrize("suffix", [".csv", ".fcsv", ".txt"])
@EXAMPLES
@given(data=st.data())
def test_lines_of_tokens_read_or_our_error(suffix: str, data) -> None:
    text = data.draw(_token_lines())
    _read_every_way(_write(f"tokens{suffix}", text.encode("utf-8", "surrogatepass")))


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True)
    | st.integers()
    | st.text(max_size=5)
    | st.sampled_from(["LPS", "RAS", "index", "mm", "um", "Fiducial", "defined", "undefined"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


def _points(size: int) -> st.SearchStrategy:
    return st.one_of(
        _JSON_VALUES, st.lists(st.floats(allow_nan=True) | st.integers(), max_size=size)
    )


@st.composite
def _our_json(draw) -> dict:
    entry = st.fixed_dictionaries(
        {"name": st.one_of(st.sampled_from(NAMES), _JSON_VALUES)},
        optional={
            "position": _points(4),
            "present": _JSON_VALUES | st.booleans(),
            "confidence": _JSON_VALUES,
        },
    )
    return draw(
        st.fixed_dictionaries(
            {
                "format": st.just(fmt.JSON_FORMAT_ID) | _JSON_VALUES,
                "landmarks": st.lists(entry, max_size=5) | _JSON_VALUES,
            },
            optional={
                "coordinate_space": st.sampled_from(["LPS", "RAS", "index"]) | _JSON_VALUES,
                "units": _JSON_VALUES,
            },
        )
    )


@st.composite
def _slicer_json(draw) -> dict:
    point = st.fixed_dictionaries(
        {},
        optional={
            "label": _JSON_VALUES,
            "id": _JSON_VALUES,
            "position": _points(4),
            "positionStatus": _JSON_VALUES,
        },
    )
    markup = st.fixed_dictionaries(
        {"controlPoints": st.lists(point, max_size=5) | _JSON_VALUES},
        optional={
            "type": st.sampled_from(["Fiducial", "PointList", "Curve"]) | _JSON_VALUES,
            "coordinateSystem": _JSON_VALUES,
            "coordinateUnits": _JSON_VALUES,
        },
    )
    return {"markups": draw(st.lists(markup, max_size=2) | _JSON_VALUES)}


@pytest.mark.parametrize(
    ("suffix", "documents"), [(".json", _our_json()), (".mrk.json", _slicer_json())]
)
@EXAMPLES
@given(data=st.data())
def test_structured_json_reads_or_our_error(suffix: str, documents, data) -> None:
    text = json.dumps(data.draw(documents))  # NaN and Infinity written as JSON allows them
    _read_every_way(_write(f"structured{suffix}", text.encode()))


@pytest.mark.parametrize(
    "parser",
    [fmt.parse_csv, fmt.parse_json, fmt.parse_slicer_json, fmt.parse_fcsv, fmt.parse_isbi_txt],
)
@EXAMPLES
@given(text=st.text(max_size=400))
def test_parsers_take_any_text(parser, text: str) -> None:
    try:
        raw = parser(text, Path("fuzz"))
    except MedlandmarkError:
        return
    assert raw.points.ndim == 2 and raw.space in fmt.SPACES


# --- Payer-style tables -------------------------------------------------------------------------


@EXAMPLES
@given(data=st.data())
def test_landmark_table_reads_or_our_error(data) -> None:
    content = data.draw(
        st.one_of(
            st.binary(max_size=400),
            mutated(VALID["table"]),
            _token_lines().map(str.encode),
        )
    )
    path = _write("table.csv", content)
    for ndim in (2, 3):
        try:
            table = read_landmark_table(path, ndim)
        except MedlandmarkError:
            continue
        assert len({points.shape for points in table.values()}) == 1
        assert all(points.shape[1] == ndim for points in table.values())


# --- dataset.json and splits.json ---------------------------------------------------------------

VALID_SPEC = json.dumps(
    DatasetSpec(
        name="fuzz",
        spatial_dims=2,
        landmarks=NAMES,
        modalities=["xray"],
        spacing_mm=[0.1, 0.1],
        symmetric_pairs=[("A", "C")],
        splits={"train": ["a", "b"]},
    ).model_dump()
).encode()
SPEC_FIELDS = list(DatasetSpec.model_fields)


def _load_spec_from(data: bytes, strict: bool = False) -> None:
    """Load ``data`` as dataset.json; our error is fine (re-raised when ``strict``)."""
    root = SCRATCH / "dataset"
    root.mkdir(exist_ok=True)
    (root / "dataset.json").write_bytes(data)
    try:
        spec = load_spec(root)
    except MedlandmarkError:
        if strict:
            raise
        return
    assert spec.spatial_dims in (2, 3) and spec.landmarks
    assert spec.spacing_mm is None or all(math.isfinite(s) and s > 0 for s in spec.spacing_mm)
    write_spec(root, spec)  # what was accepted can be written back and read again
    assert load_spec(root) == spec


@EXAMPLES
@given(data=st.binary(max_size=600))
def test_dataset_json_any_bytes(data: bytes) -> None:
    _load_spec_from(data)


@EXAMPLES
@given(data=st.data())
def test_dataset_json_mutated(data) -> None:
    _load_spec_from(data.draw(mutated(VALID_SPEC)))


@EXAMPLES
@given(
    document=st.dictionaries(
        st.sampled_from(SPEC_FIELDS) | st.text(max_size=6), _JSON_VALUES, max_size=8
    )
)
def test_dataset_json_random_fields(document: dict) -> None:
    _load_spec_from(json.dumps(document).encode())


@EXAMPLES
@given(data=st.data())
def test_dataset_json_right_fields_random_values(data) -> None:
    document = json.loads(VALID_SPEC)
    for key in data.draw(st.lists(st.sampled_from(SPEC_FIELDS), min_size=1, max_size=4)):
        document[key] = data.draw(_JSON_VALUES | st.lists(st.text(max_size=4), max_size=3))
    _load_spec_from(json.dumps(document).encode())


@EXAMPLES
@given(data=st.data())
def test_splits_json_reads_or_our_error(data) -> None:
    root = SCRATCH / "splits"
    if not (root / "dataset.json").is_file():
        root.mkdir(exist_ok=True)
        (root / "images").mkdir(exist_ok=True)
        (root / "images" / "a.png").write_bytes(b"")
        write_spec(root, DatasetSpec(name="s", spatial_dims=2, landmarks=NAMES))
    document = data.draw(
        st.one_of(
            st.binary(max_size=300),
            st.dictionaries(
                st.text(max_size=6),
                st.lists(st.text(max_size=8) | _JSON_VALUES, max_size=4) | _JSON_VALUES,
                max_size=4,
            ).map(lambda d: json.dumps(d).encode()),
        )
    )
    (root / "splits.json").write_bytes(document)
    for read in (lambda: read_splits_file(root / "splits.json"), lambda: Dataset(root).splits()):
        try:
            splits = read()
        except MedlandmarkError:
            continue
        assert all(
            isinstance(ids, list) and all(isinstance(i, str) for i in ids)
            for ids in splits.values()
        )
