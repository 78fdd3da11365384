"""Text of each landmark file format, parsed to and formatted from :class:`RawLandmarks`.

Parsers do no geometry: they return points in the space the file declares (``LPS``/``RAS``
world mm, or ``index``: voxel indices in ITK order ``x, y[, z]``); ``landmarks.py`` converts.
Every parser raises :class:`LandmarkFileError` (never another exception) on bad content.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlandmark.errors import LandmarkFileError

SPACES = ("LPS", "RAS", "index")
JSON_FORMAT_ID = "medlandmark.landmarks"
SLICER_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)
FCSV_COLUMNS = [
    "id",
    "x",
    "y",
    "z",
    "ow",
    "ox",
    "oy",
    "oz",
    "vis",
    "sel",
    "lock",
    "label",
    "desc",
    "associatedNodeID",
]


VERDICT_STATUSES = ("ok", "doubtful", "failed")


@dataclass(frozen=True)
class CaseVerdict:
    """How far a prediction of one case can be trusted: ``ok``, ``doubtful`` or ``failed``, and
    why (one short sentence per reason)."""

    status: str
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in VERDICT_STATUSES:
            raise ValueError(
                f"unknown case status {self.status!r} (use {', '.join(VERDICT_STATUSES)})"
            )

    @property
    def text(self) -> str:
        """One line: the status, then the reasons after a colon."""
        return self.status + (": " + "; ".join(self.reasons) if self.reasons else "")


@dataclass
class RawLandmarks:
    """Points as a file holds them: ``(K, D)`` in ``space``, NaN rows for missing points.

    ``recorded`` keeps positions a file gives for points it marks missing (for example outside
    the field of view); ``confidence`` is optional per-point prediction confidence.
    """

    names: list[str] | None
    points: np.ndarray
    space: str
    recorded: np.ndarray | None = None
    confidence: np.ndarray | None = None
    error_bound_mm: np.ndarray | None = None  # a prediction's radius per point (always mm)
    verdict: CaseVerdict | None = None  # a prediction's trust in the whole case


ERROR_BOUND = "error_bound_mm"  # the column / key of a prediction's error bound
MAX_COORDINATE = 1e6  # mm (or voxels): larger is no position in any image, and overflows later


def _number(text: str, path: Path, where: str) -> float:
    text = text.strip()
    if text == "" or text.lower() in ("nan", "none", "null"):
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise LandmarkFileError(f"{where}: '{text[:40]}' is not a number", path) from None
    if math.isinf(value):
        raise LandmarkFileError(f"{where}: coordinate is infinite", path)
    if abs(value) > MAX_COORDINATE:
        raise LandmarkFileError(
            f"{where}: coordinate {value:g} is beyond {MAX_COORDINATE:g} (a kilometre in mm): not "
            "a position in an image",
            path,
        )
    return value


def _csv_rows(lines: list[str], path: Path) -> list[list[str]]:
    try:
        return list(csv.reader(lines))
    except csv.Error as error:  # e.g. a field longer than the csv module's limit
        raise LandmarkFileError(f"not a readable CSV ({error})", path) from None


def _format_number(value: float) -> str:
    return "" if math.isnan(value) else repr(float(value))


def _check_points(points: list[list[float]], path: Path) -> np.ndarray:
    if not points:
        raise LandmarkFileError("file holds no landmarks", path)
    dims = {len(p) for p in points}
    if len(dims) != 1 or dims.pop() not in (2, 3):
        raise LandmarkFileError("every landmark needs 2 or 3 coordinates, all alike", path)
    array = np.asarray(points, dtype=np.float64)
    partial = np.isnan(array).any(axis=1) & ~np.isnan(array).all(axis=1)
    if partial.any():
        row = int(np.argmax(partial)) + 1
        raise LandmarkFileError(f"landmark {row} has some coordinates missing, not all", path)
    return array


def _space(value: object, path: Path) -> str:
    text = str(value).strip()
    for space in SPACES:
        if text.upper() == space.upper():
            return space
    raise LandmarkFileError(f"unknown coordinate space '{text[:40]}' (use LPS, RAS or index)", path)


# --- our CSV: "# coordinate_space: LPS" then "name,x,y[,z][,confidence]" ----------------------


def parse_csv(text: str, path: Path) -> RawLandmarks:
    lines = text.splitlines()
    space = None
    body, header_lines = [], {}
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            key, _, value = stripped.lstrip("#").partition(":")
            header_lines[key.strip().lower()] = value.strip()
            if key.strip().lower() == "coordinate_space":
                space = _space(value, path)
        elif stripped:
            body.append(line)
    if space is None:
        raise LandmarkFileError(
            "CSV landmarks must declare their space in a first line such as "
            "'# coordinate_space: LPS' (LPS or RAS world mm, or index)",
            path,
        )
    rows = _csv_rows(body, path)
    if not rows:
        raise LandmarkFileError("file holds no landmarks", path)
    header = [h.strip().lower() for h in rows[0]]
    if header[:3] != ["name", "x", "y"]:
        raise LandmarkFileError(f"header must start with name,x,y; got {','.join(rows[0])}", path)
    ndim = 3 if len(header) > 3 and header[3] == "z" else 2
    has_confidence = "confidence" in header
    has_bound = ERROR_BOUND in header
    names, points, confidence, bounds = [], [], [], []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise LandmarkFileError(
                f"row {number} has {len(row)} fields, header has {len(header)}", path
            )
        names.append(row[0].strip())
        points.append([_number(v, path, f"row {number}") for v in row[1 : 1 + ndim]])
        if has_confidence:
            confidence.append(_number(row[header.index("confidence")], path, f"row {number}"))
        if has_bound:
            bounds.append(_number(row[header.index(ERROR_BOUND)], path, f"row {number}"))
    return RawLandmarks(
        names,
        _check_points(points, path),
        space,
        confidence=np.asarray(confidence) if has_confidence else None,
        error_bound_mm=np.asarray(bounds) if has_bound else None,
        verdict=_verdict_from_text(
            header_lines.get("case_status"), header_lines.get("case_reasons"), path
        ),
    )


def format_csv(raw: RawLandmarks) -> str:
    ndim = raw.points.shape[1]
    out = io.StringIO()
    out.write(f"# coordinate_space: {raw.space}\n")
    if raw.verdict is not None:
        out.write(f"# case_status: {raw.verdict.status}\n")
        if raw.verdict.reasons:
            out.write(f"# case_reasons: {_reasons_text(raw.verdict)}\n")
    writer = csv.writer(out, lineterminator="\n")
    header = ["name", "x", "y", "z"][: ndim + 1]
    header += ["confidence"] if raw.confidence is not None else []
    writer.writerow(header + ([ERROR_BOUND] if raw.error_bound_mm is not None else []))
    for k, name in enumerate(_names(raw)):
        row = [name, *(_format_number(v) for v in raw.points[k])]
        if raw.confidence is not None:
            row.append(_format_number(raw.confidence[k]))
        if raw.error_bound_mm is not None:
            row.append(_format_number(raw.error_bound_mm[k]))
        writer.writerow(row)
    return out.getvalue()


# --- our JSON --------------------------------------------------------------------------------


def parse_json(text: str, path: Path) -> RawLandmarks:
    data = _load_json(text, path)
    if not isinstance(data, dict) or data.get("format") != JSON_FORMAT_ID:
        raise LandmarkFileError(
            f'not a medlandmark landmark file (no "format": "{JSON_FORMAT_ID}")', path
        )
    if data.get("units", "mm") != "mm":
        raise LandmarkFileError(f"units must be mm, got {data.get('units')!r}", path)
    space = _space(data.get("coordinate_space", ""), path)
    entries = data.get("landmarks")
    if not isinstance(entries, list):
        raise LandmarkFileError("'landmarks' must be a list", path)
    names, points, recorded, confidence, bounds = [], [], [], [], []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise LandmarkFileError(f"landmark {number} needs a 'name' string", path)
        position = entry.get("position")
        present = entry.get("present", position is not None)
        if position is not None and (
            not isinstance(position, list) or not all(_is_number(v) for v in position)
        ):
            raise LandmarkFileError(
                f"landmark {number}: position must be a list of numbers of at most "
                f"{MAX_COORDINATE:g} in size",
                path,
            )
        if not isinstance(present, bool):
            raise LandmarkFileError(f"landmark {number}: 'present' must be true or false", path)
        if present and position is None:
            raise LandmarkFileError(f"landmark {number} is present but has no position", path)
        names.append(entry["name"])
        points.append([float(v) for v in position] if present else None)
        recorded.append([float(v) for v in position] if (position and not present) else None)
        value = entry.get("confidence")
        confidence.append(float(value) if _is_number(value) else math.nan)
        bound = entry.get(ERROR_BOUND)
        bounds.append(float(bound) if _is_number(bound) else math.nan)
    ndim = _json_ndim(points + recorded, path)
    point_array = _check_points([p or [math.nan] * ndim for p in points], path)
    recorded_array = np.asarray([r or [math.nan] * ndim for r in recorded], dtype=np.float64)
    has_confidence = any(not math.isnan(c) for c in confidence)
    return RawLandmarks(
        names,
        point_array,
        space,
        recorded=recorded_array if not np.isnan(recorded_array).all() else None,
        confidence=np.asarray(confidence) if has_confidence else None,
        error_bound_mm=np.asarray(bounds) if any(not math.isnan(b) for b in bounds) else None,
        verdict=_json_verdict(data.get("verdict"), path),
    )


def format_json(raw: RawLandmarks) -> str:
    entries = []
    for k, name in enumerate(_names(raw)):
        point = raw.points[k]
        entry: dict = {"name": name}
        if not np.isnan(point).any():
            entry["position"] = [float(v) for v in point]
            entry["present"] = True
        else:
            kept = raw.recorded[k] if raw.recorded is not None else None
            entry["position"] = (
                None if kept is None or np.isnan(kept).any() else [float(v) for v in kept]
            )
            entry["present"] = False
        if raw.confidence is not None and not math.isnan(raw.confidence[k]):
            entry["confidence"] = float(raw.confidence[k])
        if raw.error_bound_mm is not None and not math.isnan(raw.error_bound_mm[k]):
            entry[ERROR_BOUND] = float(raw.error_bound_mm[k])
        entries.append(entry)
    document = {
        "format": JSON_FORMAT_ID,
        "version": 1,
        "coordinate_space": raw.space,
        "units": "mm",
        "landmarks": entries,
    }
    if raw.verdict is not None:
        document["verdict"] = {"status": raw.verdict.status, "reasons": list(raw.verdict.reasons)}
    return json.dumps(document, indent=2) + "\n"


# --- 3D Slicer markups JSON (.mrk.json) ------------------------------------------------------


def parse_slicer_json(text: str, path: Path) -> RawLandmarks:
    data = _load_json(text, path)
    markups = data.get("markups") if isinstance(data, dict) else None
    if not isinstance(markups, list) or not markups:
        raise LandmarkFileError("not a Slicer markups file (no 'markups' list)", path)
    points_markups = [
        m
        for m in markups
        if isinstance(m, dict) and m.get("type", "Fiducial") in ("Fiducial", "PointList")
    ]
    if len(points_markups) != 1:
        raise LandmarkFileError(
            f"expected one point list (type Fiducial), found {len(points_markups)}", path
        )
    markup = points_markups[0]
    space = _space(markup.get("coordinateSystem") or "LPS", path)
    if space == "index":
        raise LandmarkFileError("Slicer coordinateSystem must be LPS or RAS", path)
    units = markup.get("coordinateUnits", "mm")
    scale = {"mm": 1.0, "um": 1e-3}.get(units) if isinstance(units, str) else None
    if scale is None:
        raise LandmarkFileError(f"unknown coordinateUnits {markup.get('coordinateUnits')!r}", path)
    control_points = markup.get("controlPoints", [])
    if not isinstance(control_points, list):
        raise LandmarkFileError("'controlPoints' must be a list", path)
    names, points = [], []
    for number, point in enumerate(control_points, start=1):
        if not isinstance(point, dict):
            raise LandmarkFileError(f"control point {number} is not an object", path)
        label = point.get("label", point.get("id", str(number)))
        status = point.get("positionStatus", "defined")
        position = point.get("position")
        names.append(str(label))
        if status == "undefined" or position is None:
            points.append(None)
            continue
        if (
            not isinstance(position, list)
            or len(position) != 3
            or not all(_is_number(v) for v in position)
        ):
            raise LandmarkFileError(
                f"control point {number} ('{label}'): position must be 3 numbers", path
            )
        points.append([float(v) * scale for v in position])
    attributes = markup.get("attributes")
    attributes = attributes if isinstance(attributes, dict) else {}
    return RawLandmarks(
        names,
        _check_points([p or [math.nan] * 3 for p in points], path),
        space,
        verdict=_verdict_from_text(
            attributes.get(CASE_STATUS_ATTRIBUTE), attributes.get(CASE_REASONS_ATTRIBUTE), path
        ),
    )


def format_slicer_json(raw: RawLandmarks) -> str:
    points3 = _as_3d(raw.points)
    control_points = []
    for k, name in enumerate(_names(raw)):
        defined = not np.isnan(points3[k]).any()
        control_points.append(
            {
                "id": str(k + 1),
                "label": name,
                "description": _bound_text(raw, k),
                "associatedNodeID": "",
                "position": [float(v) for v in points3[k]] if defined else [0.0, 0.0, 0.0],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": True,
                "locked": False,
                "visibility": True,
                "positionStatus": "defined" if defined else "undefined",
            }
        )
    markup = {
        "type": "Fiducial",
        "coordinateSystem": raw.space,
        "coordinateUnits": "mm",
        "locked": False,
        "labelFormat": "%N-%d",
        "controlPoints": control_points,
    }
    if raw.verdict is not None:  # the schema allows further properties: Slicer keeps them
        markup["description"] = f"case {raw.verdict.text}"
        markup["attributes"] = {
            CASE_STATUS_ATTRIBUTE: raw.verdict.status,
            CASE_REASONS_ATTRIBUTE: _reasons_text(raw.verdict),
        }
    document = {"@schema": SLICER_SCHEMA, "markups": [markup]}
    return json.dumps(document, indent=2) + "\n"


# --- 3D Slicer legacy .fcsv ------------------------------------------------------------------


def parse_fcsv(text: str, path: Path) -> RawLandmarks:
    columns, space = FCSV_COLUMNS, "LPS"
    rows, case_lines = [], {}
    version_seen = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            key, _, value = stripped.lstrip("#").partition("=")
            key, value = key.strip().lower(), value.strip()
            if key.startswith("markups fiducial file version"):
                version_seen = True
            elif key == "coordinatesystem":
                space = {"0": "RAS", "ras": "RAS", "1": "LPS", "lps": "LPS"}.get(value.lower(), "")
                if not space:
                    raise LandmarkFileError(f"unknown CoordinateSystem '{value[:40]}'", path)
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
            elif key in ("case_status", "case_reasons"):
                case_lines[key] = value
        elif stripped:
            rows.append(line)
    if not version_seen:
        raise LandmarkFileError(
            "not an .fcsv file (no '# Markups fiducial file version' line)", path
        )
    for needed in ("x", "y", "z", "label"):
        if needed not in columns:
            raise LandmarkFileError(f"'# columns' lacks '{needed}'", path)
    names, points = [], []
    for number, row in enumerate(_csv_rows(rows, path), start=1):
        if len(row) < len(columns):
            raise LandmarkFileError(
                f"point {number} has {len(row)} fields, expected {len(columns)}", path
            )
        names.append(row[columns.index("label")].strip())
        points.append([_number(row[columns.index(a)], path, f"point {number}") for a in "xyz"])
    verdict = _verdict_from_text(
        case_lines.get("case_status"), case_lines.get("case_reasons"), path
    )
    return RawLandmarks(names, _check_points(points, path), space, verdict=verdict)


def format_fcsv(raw: RawLandmarks) -> str:
    points3 = _as_3d(raw.points)
    out = io.StringIO()
    out.write("# Markups fiducial file version = 4.11\n")
    out.write(f"# CoordinateSystem = {raw.space}\n")
    out.write(f"# columns = {','.join(FCSV_COLUMNS)}\n")
    if raw.verdict is not None:  # Slicer skips comment lines it does not know
        out.write(f"# case_status = {raw.verdict.status}\n")
        if raw.verdict.reasons:
            out.write(f"# case_reasons = {_reasons_text(raw.verdict)}\n")
    writer = csv.writer(out, lineterminator="\n")
    for k, name in enumerate(_names(raw)):
        coords = [_format_number(v) or "nan" for v in points3[k]]
        writer.writerow(
            [
                f"vtkMRMLMarkupsFiducialNode_{k + 1}",
                *coords,
                *(0, 0, 0, 1, 1, 1, 0),
                name,
                _bound_text(raw, k),
                "",
            ]
        )
    return out.getvalue()


CASE_STATUS_ATTRIBUTE = "medlandmark.case_status"
CASE_REASONS_ATTRIBUTE = "medlandmark.case_reasons"


def _reasons_text(verdict: CaseVerdict) -> str:
    """The reasons on one line, separated by semicolons (which no reason contains)."""
    return "; ".join(r.replace(";", ",").replace("\n", " ") for r in verdict.reasons)


def _verdict_from_text(status: object, reasons: object, path: Path) -> CaseVerdict | None:
    """A verdict from a status word and semicolon-separated reasons (None without a status)."""
    if status is None or status == "":
        return None
    if not isinstance(status, str) or status.strip() not in VERDICT_STATUSES:
        raise LandmarkFileError(
            f"case status must be one of {', '.join(VERDICT_STATUSES)}, got {str(status)[:40]!r}",
            path,
        )
    parts = reasons.split(";") if isinstance(reasons, str) else []
    return CaseVerdict(status.strip(), tuple(p.strip() for p in parts if p.strip()))


def _json_verdict(data: object, path: Path) -> CaseVerdict | None:
    if data is None:
        return None
    reasons = data.get("reasons", []) if isinstance(data, dict) else None
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise LandmarkFileError(
            "'verdict' must be an object with a 'status' and a list of 'reasons'", path
        )
    verdict = _verdict_from_text(data.get("status"), None, path)
    return None if verdict is None else CaseVerdict(verdict.status, tuple(reasons))


def _bound_text(raw: RawLandmarks, k: int) -> str:
    """A point's error bound as Slicer's description text ("" without one)."""
    if raw.error_bound_mm is None or math.isnan(raw.error_bound_mm[k]):
        return ""
    return f"error bound {raw.error_bound_mm[k]:.2f} mm"


# --- ISBI 2015 challenge .txt: "x,y" pixel lines (then optional classification lines) -----------


def parse_isbi_txt(text: str, path: Path) -> RawLandmarks:
    points = []
    for line in text.splitlines():
        fields = line.strip().split(",")
        if len(fields) != 2:
            break
        points.append([_number(f, path, f"line {len(points) + 1}") for f in fields])
    return RawLandmarks(None, _check_points(points, path), "index")


def format_isbi_txt(raw: RawLandmarks) -> str:
    if raw.space != "index" or raw.points.shape[1] != 2:
        raise LandmarkFileError("ISBI 2015 txt holds 2D pixel positions only")
    if np.isnan(raw.points).any():
        raise LandmarkFileError("ISBI 2015 txt cannot mark a landmark missing; use csv or json")
    return "".join(f"{_compact(x)},{_compact(y)}\n" for x, y in raw.points)


# --- Payer-style table: one row per case, "id,x1,y1[,z1],x2,..." ---------------------------------


def parse_table(text: str, path: Path, ndim: int) -> dict[str, np.ndarray]:
    """Rows ``id,x1,y1[,z1],...`` (an optional header row starting with ``id``) -> case -> points."""
    table: dict[str, np.ndarray] = {}
    for number, row in enumerate(_csv_rows(text.splitlines(), path), start=1):
        if not row or not "".join(row).strip():
            continue
        if number == 1 and row[0].strip().lower() in ("id", "case", "case_id", "image"):
            continue
        values = [v for v in row[1:]]
        while values and values[-1].strip() == "" and len(values) % ndim:
            values.pop()
        if not values or len(values) % ndim:
            raise LandmarkFileError(
                f"row {number}: {len(values)} coordinates is not a multiple of {ndim}", path
            )
        case_id = row[0].strip()
        if case_id in table:
            raise LandmarkFileError(f"row {number}: case '{case_id}' appears twice", path)
        coords = [_number(v, path, f"row {number}") for v in values]
        table[case_id] = _check_points(
            [coords[i : i + ndim] for i in range(0, len(coords), ndim)], path
        )
    if not table:
        raise LandmarkFileError("table holds no cases", path)
    counts = {len(points) for points in table.values()}
    if len(counts) != 1:
        raise LandmarkFileError(
            f"cases hold different numbers of landmarks: {sorted(counts)}", path
        )
    return table


def format_table(table: dict[str, np.ndarray]) -> str:
    first = next(iter(table.values()))
    count, ndim = first.shape
    axes = "xyz"[:ndim]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", *(f"{a}{k + 1}" for k in range(count) for a in axes)])
    for case_id, points in table.items():
        writer.writerow([case_id, *(_format_number(v) for v in np.asarray(points).ravel())])
    return out.getvalue()


# --- helpers ---------------------------------------------------------------------------------


def _names(raw: RawLandmarks) -> list[str]:
    return raw.names if raw.names is not None else [f"L{k + 1}" for k in range(len(raw.points))]


def _as_3d(points: np.ndarray) -> np.ndarray:
    if points.shape[1] == 3:
        return points
    return np.concatenate([points, np.where(np.isnan(points[:, :1]), np.nan, 0.0)], axis=1)


def _compact(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _is_number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and abs(value) <= MAX_COORDINATE
    except OverflowError:  # an integer beyond the float range
        return False


def _json_ndim(points: list, path: Path) -> int:
    dims = {len(p) for p in points if p is not None}
    if len(dims) > 1:
        raise LandmarkFileError("landmarks have different numbers of coordinates", path)
    return dims.pop() if dims else 3


def _load_json(text: str, path: Path) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # bad JSON, or a 5000-digit number
        raise LandmarkFileError(f"invalid JSON ({error})", path) from None
