"""What ``medlandmark review`` works on: the cases of a prediction folder with their images, and
the dataset folder the corrections go to.

A case is a landmark file in the prediction folder whose image is found among the images (a
dataset folder or a folder of images, by case id). The corrected landmarks of a case are written
to ``OUT/landmarks/<case>.json`` in world millimetres, its image copied to ``OUT/images/`` and
``OUT/dataset.json`` kept up to date, so that ``OUT`` is a dataset that ``check`` passes and
``train`` accepts. The prediction folder is only ever read. Each save is checked against the
version of the landmarks the editor loaded, so that two tabs on one case cannot silently undo
each other's work, and is logged in ``OUT/corrections.jsonl``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from medlandmark.console import warn
from medlandmark.datasets.dataset import (
    DATASET_FILE,
    DatasetSpec,
    load_spec,
    valid_case_id,
    write_spec,
)
from medlandmark.errors import MedlandmarkError
from medlandmark.inference.batch import collect_inputs
from medlandmark.io.files import full_suffix, make_parent_folder, stem
from medlandmark.io.images import ImageData, read_image, read_image_info, write_image
from medlandmark.io.landmarks import FORMAT_BY_SUFFIX, LandmarkSet, read_landmarks, write_landmarks

CORRECTIONS_LOG = "corrections.jsonl"
REVIEW_ORDER = {"failed": 0, "doubtful": 1, None: 2, "ok": 3}  # cases to look at first
NOT_CASES = {"summary"}  # files predict writes beside the landmark files
CACHED_IMAGES = 4


class UnknownCaseError(MedlandmarkError):
    """A case id that is not one of the session's cases."""


class ConflictError(MedlandmarkError):
    """The landmarks changed on disk since the editor loaded them (another tab saved)."""


@dataclass(frozen=True)
class ReviewCase:
    """One case to review: its files, the prediction's verdict and its mean peak confidence."""

    case_id: str
    prediction: Path
    image: Path
    status: str | None
    reasons: tuple[str, ...]
    mean_confidence: float | None

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "status": self.status,
            "reasons": list(self.reasons),
            "mean_confidence": self.mean_confidence,
        }


@dataclass(frozen=True)
class CaseLandmarks:
    """The landmarks an editor shows: the correction when there is one, else the prediction;
    ``version`` identifies the file they came from."""

    landmarks: LandmarkSet
    version: str
    corrected: bool


class ReviewSession:
    """The cases of ``predictions`` with images from ``images``; corrections go to ``out``.

    ``spacing_xy_mm`` is the pixel spacing of PNG/JPEG/BMP/TIFF images that store none (a
    dataset folder's ``dataset.json`` gives it otherwise); ``user`` is who the log says edited.
    """

    def __init__(
        self,
        predictions: str | Path,
        images: str | Path,
        out: str | Path,
        spacing_xy_mm: Sequence[float] | None = None,
        user: str | None = None,
    ):
        self.predictions, self.out = Path(predictions), Path(out)
        self.images_root = images = Path(images)
        self.source_spec = load_spec(images) if (images / DATASET_FILE).is_file() else None
        if spacing_xy_mm is None and self.source_spec is not None:
            spacing_xy_mm = self.source_spec.spacing_mm
        self.spacing_xy_mm = spacing_xy_mm
        self.user = user or _user_name()
        if self.out.resolve() == self.predictions.resolve():
            raise MedlandmarkError(
                "the corrected folder must not be the prediction folder: predictions are "
                "never overwritten",
                self.out,
            )
        self._cases = _review_cases(self.predictions, dict(collect_inputs([images])))
        self._lock = threading.RLock()  # save() may read the image
        self._images: OrderedDict[str, ImageData] = OrderedDict()

    def cases(self) -> list[ReviewCase]:
        """Every case, failed and doubtful first, then by rising mean confidence."""
        return sorted(
            self._cases.values(),
            key=lambda c: (
                REVIEW_ORDER.get(c.status, 2),
                np.inf if c.mean_confidence is None else c.mean_confidence,
                c.case_id,
            ),
        )

    def case(self, case_id: str) -> ReviewCase:
        if case_id not in self._cases:  # never a path built from the request
            raise UnknownCaseError(f"no case '{case_id}' in this review", self.predictions)
        return self._cases[case_id]

    def image(self, case_id: str) -> ImageData:
        """The case's image (the last few are kept in memory)."""
        case = self.case(case_id)
        with self._lock:
            if case_id in self._images:
                self._images.move_to_end(case_id)
                return self._images[case_id]
        image = read_image(case.image, self.spacing_xy_mm, allow_missing_spacing=True)
        with self._lock:
            self._images[case_id] = image
            while len(self._images) > CACHED_IMAGES:
                self._images.popitem(last=False)
        return image

    def landmarks(self, case_id: str) -> CaseLandmarks:
        """The case's current landmarks: its correction if saved, else its prediction."""
        case = self.case(case_id)
        corrected = self.correction_path(case_id)
        path = corrected if corrected.is_file() else case.prediction
        geometry = read_image_info(case.image, self.spacing_xy_mm, True).geometry
        data = path.read_bytes()
        landmarks = read_landmarks(path, geometry=geometry)
        return CaseLandmarks(landmarks, _version(data), path == corrected)

    def correction_path(self, case_id: str) -> Path:
        return self.out / "landmarks" / f"{self.case(case_id).case_id}.json"

    def save(
        self, case_id: str, points_mm: Sequence[Sequence[float] | None], base_version: str
    ) -> str:
        """Write the case's corrected landmarks (one world position per landmark, in the
        order of the file the editor loaded; None: missing) and log what changed; the new
        version. A :class:`ConflictError` when the landmarks changed since ``base_version``."""
        case = self.case(case_id)
        with self._lock:
            current = self.landmarks(case_id)
            if current.version != base_version:
                raise ConflictError(
                    "these landmarks were saved from elsewhere (another tab?) since you "
                    "loaded them: reload the case, then repeat your change",
                    self.correction_path(case_id),
                )
            names, ndim = current.landmarks.names, current.landmarks.ndim
            points = _points_array(points_mm, len(names), ndim)
            self._ensure_dataset(case, names, ndim)
            path = self.correction_path(case_id)
            write_landmarks(path, LandmarkSet(names, points))
            changes = _changes(names, current.landmarks.points_mm, points)
            self._log(case_id, changes)
            return _version(path.read_bytes())

    def _ensure_dataset(self, case: ReviewCase, names: list[str], ndim: int) -> None:
        """``OUT/dataset.json`` (written once) and the case's image under ``OUT/images``."""
        spec_path = self.out / DATASET_FILE
        if spec_path.is_file():
            spec = load_spec(self.out)
            if spec.landmarks != names:
                raise MedlandmarkError(
                    f"its landmarks ({len(spec.landmarks)}) differ from this case's "
                    f"({len(names)}): use another output folder",
                    spec_path,
                )
        else:
            write_spec(self.out, self._output_spec(names, ndim))
        target = self.out / "images" / case.image.name
        if target.exists():
            return
        if full_suffix(case.image) == ".mhd":  # its header names a data file: write both anew
            image = self.image(case.case_id)
            write_image(target, image.array, image.geometry)
        else:
            _copy_atomically(case.image, target)

    def _output_spec(self, names: list[str], ndim: int) -> DatasetSpec:
        source = self.source_spec
        pairs = [] if source is None or source.landmarks != names else source.symmetric_pairs
        return DatasetSpec(
            name=f"{source.name if source else self.predictions.name}-reviewed",
            spatial_dims=ndim,
            landmarks=names,
            modalities=source.modalities if source else ["other"],
            spacing_mm=list(self.spacing_xy_mm) if self.spacing_xy_mm else None,
            symmetric_pairs=pairs,
            description=f"landmarks of {self.predictions} reviewed with medlandmark review",
            license=source.license if source else "",
        )

    def _log(self, case_id: str, changes: list[dict]) -> None:
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "user": self.user,
            "case": case_id,
            "changes": changes,
        }
        path = self.out / CORRECTIONS_LOG
        make_parent_folder(path)
        with path.open("a", encoding="utf-8") as log:  # one write per line: no torn entries
            log.write(json.dumps(entry) + "\n")
            log.flush()
            os.fsync(log.fileno())


def _review_cases(predictions: Path, images: dict[str, Path]) -> dict[str, ReviewCase]:
    """The prediction folder's landmark files that have an image, by case id."""
    if not predictions.is_dir():
        raise MedlandmarkError("no such prediction folder", predictions)
    cases, without_image = {}, []
    for path in sorted(predictions.iterdir()):
        if not path.is_file() or full_suffix(path) not in FORMAT_BY_SUFFIX:
            continue
        case_id = stem(path)
        if case_id in NOT_CASES or not valid_case_id(case_id) or case_id in cases:
            continue
        if case_id not in images:
            without_image.append(case_id)
            continue
        cases[case_id] = _review_case(case_id, path, images[case_id])
    if without_image:
        warn(f"no image for {len(without_image)} prediction(s), not reviewed: {without_image[:5]}")
    if not cases:
        raise MedlandmarkError(
            "no landmark file here has an image among the images given", predictions
        )
    return cases


def _review_case(case_id: str, prediction: Path, image: Path) -> ReviewCase:
    landmarks = read_landmarks(prediction, ndim=None) if _in_world(prediction) else None
    verdict = landmarks.verdict if landmarks is not None else None
    confidence = None
    if landmarks is not None and landmarks.confidence is not None:
        values = np.asarray(landmarks.confidence, dtype=np.float64)
        confidence = float(np.nanmean(values)) if np.isfinite(values).any() else None
    return ReviewCase(
        case_id,
        prediction,
        image,
        verdict.status if verdict else None,
        tuple(verdict.reasons) if verdict else (),
        confidence,
    )


def _in_world(path: Path) -> bool:
    """Whether a landmark file can be read without its image (it is not in pixel indices)."""
    return FORMAT_BY_SUFFIX[full_suffix(path)] != "isbi"


def _points_array(points_mm: Sequence[Sequence[float] | None], count: int, ndim: int) -> np.ndarray:
    """``(count, ndim)`` world positions from an editor's list (None or NaN: missing)."""
    if len(points_mm) != count:
        raise MedlandmarkError(f"expected {count} landmark positions, got {len(points_mm)}")
    points = np.full((count, ndim), np.nan)
    for k, point in enumerate(points_mm):
        if point is None:
            continue
        if len(point) != ndim or not all(isinstance(v, int | float) for v in point):
            raise MedlandmarkError(f"landmark {k + 1}: expected {ndim} numbers, got {point!r}")
        points[k] = point
    if np.isinf(points).any():
        raise MedlandmarkError("landmark positions must be finite numbers of millimetres")
    return points


def _changes(names: list[str], before: np.ndarray, after: np.ndarray) -> list[dict]:
    """What a save changed, landmark by landmark: moved (by how far), marked missing or present."""
    changes = []
    for name, old, new in zip(names, before, after, strict=True):
        was, now = bool(np.isfinite(old).all()), bool(np.isfinite(new).all())
        if was and now and np.allclose(old, new, atol=1e-9):
            continue
        if not was and not now:
            continue
        entry: dict = {"landmark": name}
        if was and now:
            entry.update(
                action="moved",
                from_mm=[round(float(v), 4) for v in old],
                to_mm=[round(float(v), 4) for v in new],
                distance_mm=round(float(np.linalg.norm(new - old)), 4),
            )
        elif was:
            entry.update(action="marked missing", from_mm=[round(float(v), 4) for v in old])
        else:
            entry.update(action="marked present", to_mm=[round(float(v), 4) for v in new])
        changes.append(entry)
    return changes


def _copy_atomically(source: Path, target: Path) -> None:
    """A copy of an image file or DICOM folder that appears whole or not at all."""
    make_parent_folder(target)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        copy = temporary / target.name
        if source.is_dir():
            shutil.copytree(source, copy)
        else:
            shutil.copy2(source, copy)
        os.replace(copy, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
