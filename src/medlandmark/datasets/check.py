"""``medlandmark check``: read every file of a dataset folder and report all its problems at once.

Problems in the data are collected, never raised: one run lists every unreadable image, every
landmark file that does not match ``dataset.json``, every landmark outside its image and every
inconsistent split, each with its file. Errors fail the check; warnings do not.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.markup import escape

from medlandmark import console as console_module
from medlandmark.datasets.dataset import (
    DATASET_FILE,
    INVALID_CASE_IDS,
    SPLITS_FILE,
    Case,
    DatasetSpec,
    Problem,
    discover_cases,
    image_spec_problems,
    load_spec,
    read_splits_file,
    valid_case_id,
)
from medlandmark.errors import DatasetError, LandmarkFileError, MedlandmarkError
from medlandmark.io.geometry import Geometry, index_to_world, world_to_index
from medlandmark.io.images import read_image
from medlandmark.io.landmarks import LandmarkSet, read_landmarks

MAX_READ_WORKERS = 4
MAX_LISTED = 10
SPLIT_GROUP_SEPARATOR = "/"


@dataclass
class CheckReport:
    """Every problem found in a dataset folder, in a deterministic order."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    num_cases: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors


def check_dataset(root: str | Path) -> CheckReport:
    """Check ``dataset.json``, the case files, the splits and every image and landmark file.

    Raises :class:`DatasetError` only when ``root`` is not a folder; everything else is reported.
    """
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DatasetError(f"dataset folder {what}", root)
    report = CheckReport(root)
    try:
        spec = load_spec(root)
    except DatasetError as error:
        report.problems.append(Problem(error.path or root / DATASET_FILE, error.detail))
        return report
    cases, problems = discover_cases(root)
    report.num_cases = len(cases)
    report.problems.extend(problems)
    report.problems.extend(split_problems(root, spec, {case.case_id for case in cases}))
    for case_problems in _checked_cases(cases, spec):
        report.problems.extend(case_problems)
    return report


def print_check_report(report: CheckReport) -> None:
    """One line per problem (``error: FILE: MESSAGE``), then a coloured summary line."""
    console = console_module.console
    for problem in report.problems:
        colour = "red" if problem.severity == "error" else "yellow"
        console.print(
            f"[{colour}]{problem.severity}:[/{colour}] {escape(str(problem.path))}: "
            f"{escape(problem.message)}",
            soft_wrap=True,
        )
    n_errors, n_warnings = len(report.errors), len(report.warnings)
    summary = (
        f"checked {_count(report.num_cases, 'case')}: "
        f"{_count(n_errors, 'error')}, {_count(n_warnings, 'warning')}"
    )
    console.print(f"[{'green' if report.ok else 'red'}]{summary}[/]", soft_wrap=True)


def split_problems(root: Path, spec: DatasetSpec, case_ids: set[str]) -> list[Problem]:
    """Problems of the splits in ``splits.json`` and ``dataset.json``: invalid or unknown case
    ids (errors), ids repeated in a split or shared by two splits of one group (warnings).

    Splits named ``GROUP/NAME`` (e.g. ``fold0/train``, ``fold0/val``) form a group; splits
    without a ``/`` form one group. Splits of a group should not share cases.
    """
    problems: list[Problem] = []
    sources: list[tuple[Path, dict[str, list[str]]]] = []
    if spec.splits:
        sources.append((root / DATASET_FILE, dict(spec.splits)))
    splits_path = root / SPLITS_FILE
    if splits_path.is_file():
        if spec.splits:
            problems.append(
                Problem(
                    splits_path, "splits are given in both dataset.json and splits.json; keep one"
                )
            )
        try:
            sources.append((splits_path, read_splits_file(splits_path)))
        except DatasetError as error:
            problems.append(Problem(splits_path, error.detail))
    for path, splits in sources:
        for name, ids in splits.items():
            problems.extend(_split_id_problems(path, name, ids, case_ids))
        problems.extend(_split_overlap_problems(path, splits))
    return problems


def _split_id_problems(path: Path, name: str, ids: list[str], case_ids: set[str]) -> list[Problem]:
    problems = []
    invalid = [i for i in ids if not valid_case_id(i)]
    if invalid:
        problems.append(Problem(path, f"split '{name}' has {INVALID_CASE_IDS}: {_listed(invalid)}"))
    unknown = [i for i in ids if valid_case_id(i) and i not in case_ids]
    if unknown:
        problems.append(
            Problem(path, f"split '{name}' names cases that do not exist: {_listed(unknown)}")
        )
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        problems.append(
            Problem(
                path, f"split '{name}' lists cases more than once: {_listed(repeated)}", "warning"
            )
        )
    return problems


def _split_overlap_problems(path: Path, splits: dict[str, list[str]]) -> list[Problem]:
    problems = []
    names = list(splits)
    for a, first in enumerate(names):
        for second in names[a + 1 :]:
            if _split_group(first) != _split_group(second):
                continue
            shared = sorted(set(splits[first]) & set(splits[second]))
            if shared:
                problems.append(
                    Problem(
                        path,
                        f"splits '{first}' and '{second}' share {_count(len(shared), 'case')}: "
                        f"{_listed(shared)}",
                        "warning",
                    )
                )
    return problems


def _split_group(name: str) -> str:
    return name.rpartition(SPLIT_GROUP_SEPARATOR)[0]


def _checked_cases(cases: list[Case], spec: DatasetSpec) -> Iterable[list[Problem]]:
    """Each case's problems, in case order; images are decoded in a few threads at once
    (SimpleITK releases the GIL) and only each case's problems are kept."""
    if not cases:
        return
    workers = max(1, min(MAX_READ_WORKERS, os.cpu_count() or 1, len(cases)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check")
    try:
        results = pool.map(lambda case: case_problems(case, spec), cases)
        yield from console_module.progress(results, total=len(cases), description="checking cases")
    finally:  # Ctrl-C waits for no case that has not started, nor for the running ones here
        pool.shutdown(wait=False, cancel_futures=True)


def case_problems(case: Case, spec: DatasetSpec) -> list[Problem]:
    """Problems of one case: its image, then its landmark file against that image."""
    problems: list[Problem] = []
    geometry = _image_geometry(case, spec, problems)
    if case.landmarks_path is None:
        problems.append(
            Problem(case.image_path, f"case '{case.case_id}' has no landmark file in landmarks/")
        )
        return problems
    usable = geometry is not None and geometry.ndim == spec.spatial_dims
    try:
        landmarks = read_landmarks(
            case.landmarks_path,
            # without the image, the file is still parsed and matched against the landmark names
            geometry=geometry if usable else Geometry.identity((1,) * spec.spatial_dims),
            names=spec.landmarks,
        )
    except MedlandmarkError as error:
        problems.append(Problem(error.path or case.landmarks_path, error.detail))
        return problems
    if usable:
        problems.extend(position_problems(case.landmarks_path, landmarks, geometry))
    return problems


def _image_geometry(case: Case, spec: DatasetSpec, problems: list[Problem]) -> Geometry | None:
    """Read the image (all voxels, then dropped), record its problems and return its geometry."""
    try:
        image = read_image(case.image_path, spacing_xy_mm=spec.spacing_mm)
    except MedlandmarkError as error:
        problems.append(Problem(error.path or case.image_path, error.detail))
        return None
    except OSError as error:
        problems.append(Problem(case.image_path, f"cannot read image ({error.strerror or error})"))
        return None
    geometry, channels = image.geometry, image.channels
    del image
    for message in image_spec_problems(geometry, channels, spec):
        problems.append(Problem(case.image_path, message))
    return geometry


def position_problems(path: Path, landmarks: LandmarkSet, geometry: Geometry) -> list[Problem]:
    """Present landmarks outside the image (error); recorded positions of missing ones outside
    the image (warning)."""
    problems = []
    outside = landmarks.present & ~geometry.contains_world(landmarks.points_mm)
    if outside.any():
        listed = _outside_list(landmarks.names, landmarks.points_mm, outside, geometry)
        problems.append(Problem(path, f"landmarks outside the image: {listed}"))
    if landmarks.recorded_mm is not None:
        recorded = landmarks.recorded_mm
        known = ~landmarks.present & ~np.isnan(recorded).any(axis=1)
        outside = known & ~geometry.contains_world(recorded)
        if outside.any():
            listed = _outside_list(landmarks.names, recorded, outside, geometry)
            message = f"landmarks marked missing are recorded outside the image: {listed}"
            problems.append(Problem(path, message, "warning"))
    return problems


def check_landmarks_inside(path: Path, landmarks: LandmarkSet, geometry: Geometry) -> None:
    """Raise :class:`LandmarkFileError` when present landmarks lie outside the image (most
    often coordinates in another space: RAS for LPS, pixels for mm)."""
    errors = [p for p in position_problems(path, landmarks, geometry) if p.severity == "error"]
    if errors:
        message = f"{errors[0].message}; is the file in the right coordinate space?"
        raise LandmarkFileError(message, path)


def _outside_list(
    names: list[str], points_mm: np.ndarray, outside: np.ndarray, geometry: Geometry
) -> str:
    distances_mm = distance_outside_mm(points_mm[outside], geometry)
    outside_names = [name for name, out in zip(names, outside, strict=True) if out]
    pairs = zip(outside_names, distances_mm, strict=True)
    return _listed([f"{name} ({_mm(d)} mm outside)" for name, d in pairs])


def _mm(distance_mm: float) -> str:
    return f"{distance_mm:.1f}" if distance_mm >= 0.1 else f"{distance_mm:.2g}"


def distance_outside_mm(points_mm: np.ndarray, geometry: Geometry) -> np.ndarray:
    """World distance (mm) from each point to the image's box (voxel edges); 0 inside."""
    index = world_to_index(points_mm, geometry)
    upper = np.asarray(geometry.shape, dtype=np.float64) - 0.5
    nearest_mm = index_to_world(np.clip(index, -0.5, upper), geometry)
    return np.linalg.norm(np.asarray(points_mm, dtype=np.float64) - nearest_mm, axis=-1)


def _listed(items: list[str]) -> str:
    more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"
