"""The dataset folder: ``dataset.json`` (validated schema), ``images/``, ``landmarks/`` and splits.

Layout::

    DATASET/dataset.json
    DATASET/images/<case>.<ext>         (a DICOM series is a folder images/<case>/)
    DATASET/landmarks/<case>.<ext>      (any supported landmark format)
    DATASET/splits.json                 (optional; or "splits" inside dataset.json)
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medlandmark.errors import DatasetError, ImageError, listed, validation_problems
from medlandmark.io.files import atomic_write_text, full_suffix, stem
from medlandmark.io.geometry import Geometry
from medlandmark.io.images import IMAGE_SUFFIXES, ImageData, read_image
from medlandmark.io.landmarks import FORMAT_BY_SUFFIX, LandmarkSet, read_landmarks

MODALITIES = ("xray", "ct", "mr", "us", "other")
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DATASET_FILE = "dataset.json"
SPLITS_FILE = "splits.json"
INVALID_CASE_IDS = "invalid case ids (letters, digits, '.', '_', '-' only, no '..')"


class DatasetSpec(BaseModel):
    """Schema of ``dataset.json``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    spatial_dims: Literal[2, 3]
    landmarks: list[str] = Field(min_length=1, description="landmark names, in channel order")
    modalities: list[str] = Field(
        default_factory=lambda: ["other"],
        min_length=1,
        description=f"one per image channel: {', '.join(MODALITIES)}",
    )
    spacing_mm: list[float] | None = Field(
        default=None,
        description="pixel spacing (x, y) for formats that store none (PNG, JPEG, BMP, TIFF)",
    )
    symmetric_pairs: list[tuple[str, str]] = Field(
        default_factory=list, description="landmarks swapped by a left-right mirroring"
    )
    splits: dict[str, list[str]] | None = None
    description: str = ""
    reference: str = ""
    license: str = ""

    @field_validator("landmarks")
    @classmethod
    def _unique_names(cls, names: list[str]) -> list[str]:
        if any(not n.strip() for n in names):
            raise ValueError("landmark names must not be empty")
        duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
        if duplicates:
            raise ValueError(f"duplicate landmark names: {listed(duplicates)}")
        return names

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, modalities: list[str]) -> list[str]:
        normalised = [m.strip().lower().replace("-", "").replace(" ", "") for m in modalities]
        normalised = [
            {"mri": "mr", "radiograph": "xray", "cr": "xray", "dx": "xray"}.get(m, m)
            for m in normalised
        ]
        unknown = [m for m, n in zip(modalities, normalised, strict=True) if n not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modality {unknown} (use {', '.join(MODALITIES)})")
        return normalised

    @field_validator("spacing_mm")
    @classmethod
    def _positive_spacing(cls, spacing: list[float] | None) -> list[float] | None:
        if spacing is not None and (not spacing or any(not (s > 0 and s < 1e4) for s in spacing)):
            raise ValueError(f"spacing_mm must hold positive numbers, got {spacing}")
        return spacing

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        if self.spacing_mm is not None and len(self.spacing_mm) not in (1, self.spatial_dims):
            raise ValueError(f"spacing_mm needs 1 or {self.spatial_dims} values")
        seen: set[str] = set()
        for left, right in self.symmetric_pairs:
            for name in (left, right):
                if name not in self.landmarks:
                    raise ValueError(f"symmetric pair names unknown landmark '{name}'")
                if name in seen:
                    raise ValueError(f"landmark '{name}' is in more than one symmetric pair")
                seen.add(name)
            if left == right:
                raise ValueError(f"landmark '{left}' cannot be paired with itself")
        for split, ids in (self.splits or {}).items():
            bad = [i for i in ids if not CASE_ID_PATTERN.match(i)]
            if bad:
                raise ValueError(f"split '{split}' has invalid case ids: {bad[:5]}")
        return self

    @property
    def num_channels(self) -> int:
        return len(self.modalities)


@dataclass(frozen=True)
class Problem:
    """Something wrong with a file of the dataset; warnings do not fail ``check``."""

    path: Path
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


@dataclass(frozen=True)
class Case:
    """One case: its id, its image (file or DICOM folder) and its landmark file, if any."""

    case_id: str
    image_path: Path
    landmarks_path: Path | None


def load_spec(root: str | Path) -> DatasetSpec:
    """Read and validate ``dataset.json``; every schema violation is listed in the error."""
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        raise DatasetError("no dataset.json here: is this a dataset folder?", Path(root))
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, a 5000-digit number
        raise DatasetError(f"invalid JSON ({error})", path) from None
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as error:
        raise DatasetError(_schema_message(error), path) from None


def write_spec(root: str | Path, spec: DatasetSpec) -> None:
    """Write ``dataset.json`` atomically."""
    text = json.dumps(spec.model_dump(exclude_defaults=False), indent=2) + "\n"
    atomic_write_text(Path(root) / DATASET_FILE, text)


def valid_case_id(case_id: str) -> bool:
    """True for ids made of letters, digits, '.', '_' and '-' that cannot escape a folder."""
    return bool(CASE_ID_PATTERN.match(case_id)) and ".." not in case_id


def discover_cases(root: str | Path) -> tuple[list[Case], list[Problem]]:
    """Pair ``images/<case>.*`` with ``landmarks/<case>.*``; return the cases and the problems."""
    root = Path(root)
    problems: list[Problem] = []
    images = _entries_by_case(root / "images", _is_image_entry, problems)
    landmarks = _entries_by_case(root / "landmarks", _is_landmark_entry, problems)
    if not (root / "images").is_dir():
        problems.append(Problem(root / "images", "missing images/ folder"))
    for case_id in sorted(set(landmarks) - set(images)):
        problems.append(
            Problem(landmarks[case_id], f"landmarks for case '{case_id}' have no image")
        )
    cases = [Case(c, images[c], landmarks.get(c)) for c in sorted(images)]
    if not cases and (root / "images").is_dir():
        problems.append(Problem(root / "images", "dataset holds no images"))
    return cases, problems


class Dataset:
    """An opened dataset folder: its spec, its cases and their splits."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.spec = load_spec(self.root)
        self.cases, problems = discover_cases(self.root)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            listed = "; ".join(f"{p.path}: {p.message}" for p in errors[:10])
            more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
            raise DatasetError(
                f"dataset folder has problems (run 'medlandmark check'): {listed}{more}", self.root
            )
        self._by_id = {case.case_id: case for case in self.cases}

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]

    def case(self, case_id: str) -> Case:
        if case_id not in self._by_id:
            raise DatasetError(f"no case '{case_id}' in this dataset", self.root)
        return self._by_id[case_id]

    @property
    def spacing_xy_mm(self) -> Sequence[float] | None:
        return self.spec.spacing_mm

    def read_image(self, case_id: str) -> ImageData:
        """A case's image; one whose dimensionality or channels contradict dataset.json is an
        :class:`ImageError`."""
        path = self.case(case_id).image_path
        image = read_image(path, spacing_xy_mm=self.spec.spacing_mm)
        problems = image_spec_problems(image.geometry, image.channels, self.spec)
        if problems:
            raise ImageError("; ".join(problems), path)
        return image

    def read_landmarks(self, case_id: str, image: ImageData | None = None) -> LandmarkSet:
        """A case's landmarks in world mm, in the dataset's landmark order."""
        case = self.case(case_id)
        if case.landmarks_path is None:
            raise DatasetError(f"case '{case_id}' has no landmark file", self.root / "landmarks")
        if image is None:
            from medlandmark.io.images import read_image_info

            geometry = read_image_info(case.image_path, self.spec.spacing_mm).geometry
        else:
            geometry = image.geometry
        return read_landmarks(case.landmarks_path, geometry=geometry, names=self.spec.landmarks)

    def splits(self) -> dict[str, list[str]]:
        """Named splits from ``splits.json`` or ``dataset.json`` (empty when neither has any)."""
        path = self.root / SPLITS_FILE
        if path.is_file():
            if self.spec.splits:
                raise DatasetError(
                    "splits are given in both dataset.json and splits.json", self.root
                )
            splits = read_splits_file(path)
        else:
            path, splits = self.root / DATASET_FILE, dict(self.spec.splits or {})
        for name, ids in splits.items():
            invalid = [i for i in ids if not valid_case_id(i)]
            if invalid:  # an id such as '../x' would reach outside the dataset's folders
                listed = ", ".join(invalid[:10])
                raise DatasetError(f"split '{name}' has {INVALID_CASE_IDS}: {listed}", path)
        return splits

    def split(self, name: str) -> list[str]:
        splits = self.splits()
        if name not in splits:
            known = ", ".join(splits) or "none"
            raise DatasetError(f"no split named '{name}' (known: {known})", self.root)
        return splits[name]


def image_spec_problems(geometry: Geometry, channels: int, spec: DatasetSpec) -> list[str]:
    """What makes an image unfit for ``dataset.json``: its dimensionality, its channel count."""
    problems = []
    if geometry.ndim != spec.spatial_dims:
        problems.append(
            f"image is {geometry.ndim}D (shape {geometry.shape}) but dataset.json declares "
            f"spatial_dims {spec.spatial_dims}"
        )
    if channels != spec.num_channels:
        n = spec.num_channels
        problems.append(
            f"image has {channels} channel{'s' * (channels != 1)} but dataset.json declares "
            f"{n} {'modality' if n == 1 else 'modalities'} ({', '.join(spec.modalities)})"
        )
    return problems


def read_splits_file(path: Path) -> dict[str, list[str]]:
    """``splits.json``: split name -> list of case ids."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, a 5000-digit number
        raise DatasetError(f"invalid JSON ({error})", path) from None
    except OSError as error:
        raise DatasetError(f"cannot read file ({error.strerror})", path) from None
    if not isinstance(data, dict) or not all(
        isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in data.values()
    ):
        raise DatasetError("splits.json must map split names to lists of case ids", path)
    return data


def _is_image_entry(path: Path) -> bool:
    return path.is_dir() or full_suffix(path) in IMAGE_SUFFIXES


def _is_landmark_entry(path: Path) -> bool:
    return path.is_file() and full_suffix(path) in FORMAT_BY_SUFFIX


BROKEN_LINK = "is a symbolic link that leads nowhere (a broken link, or a loop)"


def _entries_by_case(folder: Path, accept, problems: list[Problem]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or full_suffix(entry) == ".raw":
            continue
        if entry.is_symlink() and not entry.exists():
            problems.append(Problem(entry, BROKEN_LINK))
            continue
        if not accept(entry):
            problems.append(Problem(entry, "unsupported file type, ignored", "warning"))
            continue
        case_id = entry.name if entry.is_dir() else stem(entry)
        if not valid_case_id(case_id):
            problems.append(
                Problem(entry, f"invalid case id '{case_id}' (letters, digits, '.', '_', '-' only)")
            )
        elif case_id in found:
            problems.append(
                Problem(entry, f"duplicate case id '{case_id}' (also {found[case_id].name})")
            )
        else:
            found[case_id] = entry
    return found


def _schema_message(error: ValidationError) -> str:
    return "dataset.json does not match the schema: " + validation_problems(error, "(top level)")
