"""Evaluate predicted landmark files against ground truth, in world millimetres.

:func:`evaluate` reads one prediction file per case (``<case_id>.<ext>``, any world-coordinate
landmark format), pairs it by case id and landmark name with the ground truth (a dataset folder
or a plain folder of landmark files), and writes ``metrics.json``, ``radial_errors.csv``,
``report.md``, ``report.html`` (with overlays of the worst cases when the ground truth is a
dataset with images) and PNG plots. The metrics themselves are in :mod:`.metrics`, the rendering
in :mod:`.report` and :mod:`.html_report`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medlandmark import metrics as m
from medlandmark.console import info, progress
from medlandmark.errors import DatasetError, LandmarkFileError
from medlandmark.evaluation.html_report import write_html_report, write_worst_case_overlays
from medlandmark.evaluation.report import WORST_CASES_SHOWN, print_summary, write_report
from medlandmark.io.files import atomic_write_text, full_suffix, stem
from medlandmark.io.landmark_formats import VERDICT_STATUSES, CaseVerdict
from medlandmark.io.landmarks import FORMAT_BY_SUFFIX, LandmarkSet, read_landmarks
from medlandmark.metrics import DEFAULT_RADII_MM
from medlandmark.records.run import PREDICTION_SUMMARY_FILE

if TYPE_CHECKING:
    from medlandmark.datasets.dataset import Dataset

__all__ = ["evaluate", "print_summary"]

METRICS_FILE = "metrics.json"
ERRORS_FILE = "radial_errors.csv"


@dataclass
class Pairs:
    """Predictions and ground truth of the evaluated cases, ``(N, K, D)`` world mm each, and
    the ground-truth dataset (None for a plain folder of landmark files: no images)."""

    case_ids: list[str]
    names: list[str]
    pred_mm: np.ndarray
    gt_mm: np.ndarray
    gt_cases_without_prediction: int
    dataset: Dataset | None = None
    error_bound_mm: np.ndarray | None = None  # (N, K) the predictions' radii, NaN where none
    verdicts: list[CaseVerdict | None] | None = None  # the predictions' case verdicts

    def landmark_sets(self, case_id: str) -> tuple[LandmarkSet, LandmarkSet]:
        """Prediction and ground truth of one case."""
        i = self.case_ids.index(case_id)
        return LandmarkSet(self.names, self.pred_mm[i]), LandmarkSet(self.names, self.gt_mm[i])


def evaluate(
    pred_dir: str | Path,
    gt: str | Path,
    out_dir: str | Path,
    radii: Sequence[float] = DEFAULT_RADII_MM,
) -> dict:
    """Evaluate the cases of ``pred_dir`` against ``gt`` (dataset folder or folder of landmark
    files); write ``metrics.json``, ``radial_errors.csv``, ``report.md``, ``report.html`` and
    plots to ``out_dir`` and return the metrics."""
    pred_dir, gt, out_dir = Path(pred_dir), Path(gt), Path(out_dir)
    radii_mm = _checked_radii(radii)
    pairs = load_pairs(pred_dir, gt)
    errors_mm = m.radial_errors_mm(pairs.pred_mm, pairs.gt_mm)
    pred_present = ~np.isnan(pairs.pred_mm).any(axis=-1)
    gt_present = ~np.isnan(pairs.gt_mm).any(axis=-1)
    metrics = {
        "pred_dir": str(pred_dir),
        "gt": str(gt),
        "ndim": int(pairs.pred_mm.shape[-1]),
        "n_gt_cases_without_prediction": pairs.gt_cases_without_prediction,
        **m.summarize(errors_mm, pred_present, gt_present, pairs.case_ids, pairs.names, radii_mm),
    }
    if pairs.error_bound_mm is not None:
        metrics["error_bound"] = bound_coverage(errors_mm, pairs.error_bound_mm, pairs.names)
    if pairs.verdicts is not None:
        metrics["verdict"] = verdict_metrics(pairs, errors_mm, pred_present, gt_present, radii_mm)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_dir / ERRORS_FILE, _errors_csv(pairs, errors_mm, pred_present, gt_present)
    )
    metrics = _rounded(metrics)  # the reports show exactly the numbers of metrics.json
    metrics["files"] = {
        "errors_csv": ERRORS_FILE,
        **write_report(out_dir, metrics, errors_mm, pairs.names),
    }
    worst = metrics["worst_cases"][:WORST_CASES_SHOWN]
    overlays = write_worst_case_overlays(
        out_dir,
        worst,
        {row["case_id"]: pairs.landmark_sets(row["case_id"]) for row in worst},
        pairs.dataset,
    )
    metrics["files"]["html_report"] = write_html_report(out_dir, metrics, overlays)
    metrics["files"]["overlays"] = list(overlays.files.values())
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return metrics


def load_pairs(pred_dir: Path, gt: Path) -> Pairs:
    """Read every prediction of ``pred_dir`` and its ground truth, matched by landmark name."""
    predictions = prediction_files(pred_dir)
    truth = _GroundTruth.open(gt)
    for case_id, path in predictions.items():
        if case_id not in truth.files:
            raise DatasetError(
                f"prediction for case '{case_id}' has no ground truth in {gt} "
                "(remove it or add the case's landmarks)",
                path,
            )
    names: list[str] | None = None
    pred_sets, gt_sets, bounds, verdicts = [], [], [], []
    for case_id, path in progress(
        predictions.items(), total=len(predictions), description="evaluating"
    ):
        gt_set, pred_set = truth.read_pair(case_id, path, names)
        if names is None:
            names = gt_set.names
        elif pred_set.ndim != pred_sets[0].shape[1]:
            raise LandmarkFileError(
                f"{pred_set.ndim}D landmarks, but other cases are {pred_sets[0].shape[1]}D", path
            )
        pred_sets.append(pred_set.points_mm)
        gt_sets.append(gt_set.points_mm)
        bound = pred_set.error_bound_mm
        bounds.append(np.full(len(pred_set.names), np.nan) if bound is None else bound)
        verdicts.append(pred_set.verdict)
    unpredicted = len(set(truth.files) - set(predictions))
    if unpredicted:
        info(f"{unpredicted} ground-truth cases have no prediction and are not evaluated")
    return Pairs(
        list(predictions),
        names or [],
        np.stack(pred_sets),
        np.stack(gt_sets),
        unpredicted,
        truth.dataset,
        np.stack(bounds) if bounds and np.isfinite(np.stack(bounds)).any() else None,
        verdicts if any(v is not None for v in verdicts) else None,
    )


def bound_coverage(errors_mm: np.ndarray, bounds_mm: np.ndarray, names: Sequence[str]) -> dict:
    """How often the predictions' error bounds held: percent of the points with an error and a
    bound whose error is within it, overall and per landmark."""
    return {
        "coverage_percent": m.bound_coverage(errors_mm, bounds_mm),
        "n_points": int((np.isfinite(errors_mm) & np.isfinite(bounds_mm)).sum()),
        "median_bound_mm": float(np.nanmedian(bounds_mm)),
        "per_landmark_coverage_percent": {
            name: m.bound_coverage(errors_mm[:, k], bounds_mm[:, k]) for k, name in enumerate(names)
        },
        "rule": "percent of points with both an error and a bound whose radial error <= the bound",
    }


def verdict_metrics(
    pairs: Pairs,
    errors_mm: np.ndarray,
    pred_present: np.ndarray,
    gt_present: np.ndarray,
    radii_mm: Sequence[float],
) -> dict:
    """The predictions' case verdicts: how many of each, the metrics of the ``ok`` cases alone,
    how well the flags (doubtful, failed) separate bad cases from good ones, and the flagged
    cases with their reasons."""
    statuses = [None if v is None else v.status for v in pairs.verdicts]
    ok = np.array([s == "ok" for s in statuses])
    flagged = np.array([s in ("doubtful", "failed") for s in statuses])
    bad = m.bad_cases(errors_mm, pred_present, gt_present)
    ok_ids = [c for c, keep in zip(pairs.case_ids, ok, strict=True) if keep]
    ok_summary = m.summarize(
        errors_mm[ok], pred_present[ok], gt_present[ok], ok_ids, pairs.names, radii_mm
    )
    case_mre = [m.error_statistics(errors_mm[i])["mre_mm"] for i in range(len(statuses))]
    return {
        "counts": {s: statuses.count(s) for s in VERDICT_STATUSES},
        "without_verdict": statuses.count(None),
        "ok_cases": {
            key: ok_summary[key]
            for key in ("n_cases", "n_points", "mre_mm", "sd_mm", "sdr", "missing")
        },
        **m.verdict_separation(bad, flagged),
        "flagged": [
            {
                "case_id": case_id,
                "status": verdict.status,
                "reasons": list(verdict.reasons),
                "mre_mm": case_mre[i],
                "bad": bool(bad[i]),
            }
            for i, (case_id, verdict) in enumerate(zip(pairs.case_ids, pairs.verdicts, strict=True))
            if flagged[i]
        ],
    }


def prediction_files(pred_dir: Path) -> dict[str, Path]:
    """Case id -> landmark file of a folder (hidden files, other file types and the summary
    that ``predict`` writes are skipped)."""
    files = landmark_files(pred_dir, "prediction")
    files = {case: path for case, path in files.items() if path.name != PREDICTION_SUMMARY_FILE}
    if not files:
        raise DatasetError(
            f"no prediction files here (one landmark file per case: <case_id>"
            f"{'|'.join(FORMAT_BY_SUFFIX)})",
            pred_dir,
        )
    return files


def landmark_files(folder: Path, role: str) -> dict[str, Path]:
    """Case id -> landmark file in ``folder``, sorted by case id; two files for one case is an error."""
    if not folder.is_dir():
        raise DatasetError(f"{role} folder does not exist or is not a folder", folder)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if (
            path.name.startswith(".")
            or not path.is_file()
            or full_suffix(path) not in FORMAT_BY_SUFFIX
        ):
            continue
        case_id = stem(path)
        if case_id in found:
            raise DatasetError(
                f"two {role} files for case '{case_id}' (also {found[case_id].name})", path
            )
        found[case_id] = path
    return dict(sorted(found.items()))


class _GroundTruth:
    """Ground-truth landmarks by case id, from a dataset folder or a folder of landmark files."""

    def __init__(self, files: dict[str, Path], dataset=None):
        self.files = files
        self.dataset = dataset

    @classmethod
    def open(cls, gt: Path) -> _GroundTruth:
        from medlandmark.datasets.dataset import DATASET_FILE, Dataset

        if (gt / DATASET_FILE).is_file():
            dataset = Dataset(gt)
            files = {
                c.case_id: c.landmarks_path for c in dataset.cases if c.landmarks_path is not None
            }
            if not files:
                raise DatasetError(
                    "dataset has no landmark files to evaluate against", gt / "landmarks"
                )
            return cls(files, dataset)
        files = landmark_files(gt, "ground-truth")
        if not files:
            raise DatasetError(
                "no ground truth here: give a dataset folder (with dataset.json) or a folder of "
                "landmark files named <case_id>.<ext>",
                gt,
            )
        return cls(files)

    def read_pair(
        self, case_id: str, pred_path: Path, names: Sequence[str] | None
    ) -> tuple[LandmarkSet, LandmarkSet]:
        """Ground truth and prediction of one case, in the same landmark order and dimension."""
        if self.dataset is not None:
            return self._read_dataset_pair(case_id, pred_path)
        gt_path = self.files[case_id]
        gt_set = read_landmarks(gt_path, names=names)
        pred_set = read_landmarks(pred_path, names=gt_set.names)
        if pred_set.ndim != gt_set.ndim:  # a 2D case saved in a 3D format (z = 0), e.g. Slicer's
            gt_set = read_landmarks(gt_path, names=names, ndim=2)
            pred_set = read_landmarks(pred_path, names=gt_set.names, ndim=2)
        return gt_set, pred_set

    def _read_dataset_pair(self, case_id: str, pred_path: Path) -> tuple[LandmarkSet, LandmarkSet]:
        from medlandmark.io.images import read_image_info

        spec = self.dataset.spec
        geometry = read_image_info(self.dataset.case(case_id).image_path, spec.spacing_mm).geometry
        gt_set = read_landmarks(self.files[case_id], geometry=geometry, names=spec.landmarks)
        pred_set = read_landmarks(pred_path, geometry=geometry, names=spec.landmarks)
        return gt_set, pred_set


def _checked_radii(radii: Sequence[float]) -> list[float]:
    values = sorted({float(r) for r in radii})
    if not values or any(not np.isfinite(r) or r <= 0 for r in values):
        raise ValueError(f"SDR radii must be positive millimetres, got {list(radii)}")
    return values


def _errors_csv(
    pairs: Pairs, errors_mm: np.ndarray, pred_present: np.ndarray, gt_present: np.ndarray
) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["case_id", "landmark", "radial_error_mm", "pred_present", "gt_present"])
    for i, case_id in enumerate(pairs.case_ids):
        for k, name in enumerate(pairs.names):
            error = "" if np.isnan(errors_mm[i, k]) else f"{errors_mm[i, k]:.6f}"
            writer.writerow([case_id, name, error, int(pred_present[i, k]), int(gt_present[i, k])])
    return out.getvalue()


def _rounded(value, digits: int = 6):
    """Floats rounded for a readable metrics.json (1e-6 mm is far below any landmark error)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value
