"""Landmark sets in world millimetres, and reading/writing them in every supported format.

In memory a landmark set is ``(K, D)`` world LPS millimetres plus names; a missing landmark is
a row of NaN. Formats (chosen by suffix): ``.csv`` and ``.json`` (ours), ``.mrk.json`` and
``.fcsv`` (3D Slicer), ``.txt`` (ISBI 2015 pixel positions). Payer-style tables with one row
per case are read and written by :func:`read_landmark_table` / :func:`write_landmark_table`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlandmark.errors import LandmarkFileError, listed
from medlandmark.io import landmark_formats as fmt
from medlandmark.io.files import atomic_write_text, full_suffix
from medlandmark.io.geometry import (
    Geometry,
    itk_index_to_world,
    lps_to_ras,
    ras_to_lps,
    world_to_itk_index,
)
from medlandmark.io.landmark_formats import CaseVerdict

FORMAT_BY_SUFFIX = {
    ".csv": "csv",
    ".json": "json",
    ".mrk.json": "mrk.json",
    ".fcsv": "fcsv",
    ".txt": "isbi",
}
SUFFIX_BY_FORMAT = {name: suffix for suffix, name in FORMAT_BY_SUFFIX.items()}
PARSERS = {
    "csv": fmt.parse_csv,
    "json": fmt.parse_json,
    "mrk.json": fmt.parse_slicer_json,
    "fcsv": fmt.parse_fcsv,
    "isbi": fmt.parse_isbi_txt,
}
FORMATTERS = {
    "csv": fmt.format_csv,
    "json": fmt.format_json,
    "mrk.json": fmt.format_slicer_json,
    "fcsv": fmt.format_fcsv,
    "isbi": fmt.format_isbi_txt,
}
MAX_LANDMARK_FILE_BYTES = 64 * 1024 * 1024


@dataclass
class LandmarkSet:
    """Named landmarks, ``points_mm`` ``(K, D)`` in world LPS millimetres, NaN rows = missing.

    ``recorded_mm`` keeps known positions of points marked missing (e.g. outside the field of
    view); ``confidence`` is a prediction's per-point confidence and ``error_bound_mm`` its radius
    (mm) within which the true point lies with the run's stated probability; ``verdict`` is a
    prediction's trust in the whole case (:class:`~medlandmark.io.landmark_formats.CaseVerdict`).
    """

    names: list[str]
    points_mm: np.ndarray
    recorded_mm: np.ndarray | None = None
    confidence: np.ndarray | None = field(default=None)
    error_bound_mm: np.ndarray | None = field(default=None)
    verdict: CaseVerdict | None = field(default=None)

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        self.points_mm = np.asarray(self.points_mm, dtype=np.float64).reshape(len(self.names), -1)
        if len(set(self.names)) != len(self.names):
            counts = Counter(self.names)
            duplicates = sorted(n for n, count in counts.items() if count > 1)
            raise LandmarkFileError(f"duplicate landmark names: {listed(duplicates)}")

    @property
    def ndim(self) -> int:
        return self.points_mm.shape[1]

    @property
    def present(self) -> np.ndarray:
        """Boolean ``(K,)``: True where the landmark has a position."""
        return ~np.isnan(self.points_mm).any(axis=1)

    def select(self, names: Sequence[str], path: str | Path | None = None) -> LandmarkSet:
        """The same landmarks in the order of ``names``; every name must be present exactly."""
        wanted, position = set(names), {n: i for i, n in enumerate(self.names)}
        unknown = [n for n in self.names if n not in wanted]
        absent = [n for n in names if n not in position]
        if unknown or absent:
            parts = []
            if unknown:
                parts.append(f"unknown landmark names: {listed(unknown)}")
            if absent:
                parts.append(f"landmarks not in the file: {listed(absent)}")
            raise LandmarkFileError("; ".join(parts), path)
        order = [position[n] for n in names]
        return LandmarkSet(
            list(names),
            self.points_mm[order],
            None if self.recorded_mm is None else self.recorded_mm[order],
            None if self.confidence is None else self.confidence[order],
            None if self.error_bound_mm is None else self.error_bound_mm[order],
            self.verdict,
        )


def symmetric_pair_indices(
    names: Sequence[str], pairs: Sequence[tuple[str, str]]
) -> list[tuple[int, int]]:
    """Index pairs of ``dataset.json``'s ``symmetric_pairs`` in the landmark order ``names``."""
    position = {name: i for i, name in enumerate(names)}
    missing = sorted({n for pair in pairs for n in pair} - set(position))
    if missing:
        raise ValueError(f"symmetric pairs name landmarks not in the list: {', '.join(missing)}")
    return [(position[left], position[right]) for left, right in pairs]


def pair_permutation(count: int, pairs: Sequence[tuple[int, int]]) -> list[int]:
    """Landmark order after a mirroring: each index of a symmetric pair takes the other's place."""
    order = list(range(count))
    for left, right in pairs:
        if not (0 <= left < count and 0 <= right < count) or left == right:
            raise ValueError(f"symmetric pair ({left}, {right}) is not two of {count} landmarks")
        order[left], order[right] = right, left
    return order


def landmark_format(path: str | Path) -> str:
    """The format name a landmark file's suffix stands for."""
    suffix = full_suffix(path)
    if suffix not in FORMAT_BY_SUFFIX:
        raise LandmarkFileError(
            f"unknown landmark file type '{suffix}' (supported: {', '.join(FORMAT_BY_SUFFIX)})",
            path,
        )
    return FORMAT_BY_SUFFIX[suffix]


def read_landmarks(
    path: str | Path,
    geometry: Geometry | None = None,
    names: Sequence[str] | None = None,
    ndim: int | None = None,
) -> LandmarkSet:
    """Read a landmark file as world LPS mm.

    ``geometry`` is needed for files in pixel/voxel indices (ISBI txt, ``index`` space) and sets
    the dimensionality; ``names`` orders the result (unnamed formats take them in file order).
    """
    path = Path(path)
    raw = PARSERS[landmark_format(path)](_read_text(path), path)
    ndim = geometry.ndim if geometry is not None else ndim
    points = _points_in_ndim(raw.points, ndim, path)
    recorded = None if raw.recorded is None else _points_in_ndim(raw.recorded, ndim, path)
    with np.errstate(over="ignore"):  # an overflow is refused just below
        points, recorded = (_to_world(p, raw.space, geometry, path) for p in (points, recorded))
    if np.isinf(points).any() or (recorded is not None and np.isinf(recorded).any()):
        raise LandmarkFileError("coordinates too large to be positions in mm", path)
    if raw.names is None:
        if names is not None and len(names) != len(points):
            raise LandmarkFileError(
                f"file holds {len(points)} landmarks, expected {len(names)}", path
            )
        file_names = list(names) if names is not None else [f"L{k + 1}" for k in range(len(points))]
    else:
        file_names = raw.names
    try:
        landmarks = LandmarkSet(
            file_names, points, recorded, raw.confidence, raw.error_bound_mm, raw.verdict
        )
    except LandmarkFileError as error:
        raise LandmarkFileError(error.detail, path) from None
    return landmarks.select(names, path) if names is not None else landmarks


def write_landmarks(
    path: str | Path,
    landmarks: LandmarkSet,
    geometry: Geometry | None = None,
    space: str = "LPS",
) -> None:
    """Write landmarks atomically in the format of the suffix, in ``space`` (LPS, RAS or index)."""
    path = Path(path)
    format_name = landmark_format(path)
    space = "index" if format_name == "isbi" else space
    if format_name in ("mrk.json", "fcsv") and space == "index":
        raise LandmarkFileError(
            "Slicer files hold world coordinates (LPS or RAS), not indices", path
        )
    raw = fmt.RawLandmarks(
        landmarks.names,
        _from_world(landmarks.points_mm, space, geometry, path),
        space,
        None
        if landmarks.recorded_mm is None
        else _from_world(landmarks.recorded_mm, space, geometry, path),
        landmarks.confidence,
        landmarks.error_bound_mm,
        landmarks.verdict,
    )
    try:
        text = FORMATTERS[format_name](raw)
    except LandmarkFileError as error:
        raise LandmarkFileError(error.detail, path) from None
    atomic_write_text(path, text)


def read_landmark_table(path: str | Path, ndim: int) -> dict[str, np.ndarray]:
    """Payer-style rows ``id,x1,y1[,z1],...`` as case id -> ``(K, ndim)`` in the file's units."""
    path = Path(path)
    return fmt.parse_table(_read_text(path), path, ndim)


def write_landmark_table(path: str | Path, table: dict[str, np.ndarray]) -> None:
    """Write case id -> ``(K, D)`` points as Payer-style rows, atomically."""
    if not table:
        raise LandmarkFileError("no cases to write", path)
    atomic_write_text(path, fmt.format_table(table))


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_LANDMARK_FILE_BYTES:
            raise LandmarkFileError(f"file is {size:,} bytes, too large for a landmark file", path)
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise LandmarkFileError("landmark file does not exist", path) from None
    except UnicodeDecodeError:
        raise LandmarkFileError("not a text file (invalid UTF-8)", path) from None
    except OSError as error:
        raise LandmarkFileError(f"cannot read file ({error.strerror})", path) from None


def _points_in_ndim(points: np.ndarray, ndim: int | None, path: Path) -> np.ndarray:
    if ndim is None or points.shape[1] == ndim:
        return points
    if points.shape[1] == 3 and ndim == 2:
        z = points[:, 2][~np.isnan(points[:, 2])]
        if np.allclose(z, 0.0, atol=1e-6):
            return points[:, :2]
    raise LandmarkFileError(
        f"file holds {points.shape[1]}D points (z not 0) where {ndim}D ones are expected", path
    )


def _to_world(points: np.ndarray | None, space: str, geometry: Geometry | None, path: Path):
    if points is None:
        return None
    if space == "LPS":
        return points
    if space == "RAS":
        return ras_to_lps(points)
    if geometry is None:
        raise LandmarkFileError(
            "landmarks are in pixel/voxel indices: the image geometry is needed", path
        )
    return itk_index_to_world(points, geometry)


def _from_world(
    points: np.ndarray, space: str, geometry: Geometry | None, path: Path
) -> np.ndarray:
    if space == "LPS":
        return points
    if space == "RAS":
        return lps_to_ras(points)
    if space != "index":
        raise LandmarkFileError(f"unknown coordinate space '{space}' (use LPS, RAS or index)", path)
    if geometry is None:
        raise LandmarkFileError("writing pixel/voxel indices needs the image geometry", path)
    return world_to_itk_index(points, geometry)
