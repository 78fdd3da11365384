"""Dataset fingerprint: what the planner needs to know about the images and the landmarks.

Intensity statistics are taken over the image (X-ray, MR) or the body (CT: voxels above
-500 HU), never over landmark voxels only, from a fixed number of voxels sampled per case.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlandmark.console import progress
from medlandmark.datasets.check import check_landmarks_inside
from medlandmark.datasets.dataset import Dataset
from medlandmark.errors import LandmarkFileError
from medlandmark.io.files import atomic_write_text
from medlandmark.io.geometry import Geometry, canonical_axes, reoriented_geometry
from medlandmark.io.landmarks import read_landmarks

FINGERPRINT_VERSION = 2  # 2: shapes and spacings in the canonical orientation
VOXELS_SAMPLED_PER_CASE = 20_000
CT_BODY_THRESHOLD_HU = -500.0


@dataclass
class CaseFingerprint:
    case_id: str
    shape: list[int]
    spacing_mm: list[float]
    orientation: str
    points_mm: list[list[float]]
    extent_mm: list[float]
    intensity_samples: list[np.ndarray]


def orientation_code(geometry: Geometry) -> str:
    """Anatomical direction each array axis points to, e.g. ``'SPR'`` for a NIfTI in RAS+ order
    read as (z, y, x) (letters: L/R, P/A, S/I; 2D images use the first two)."""
    letters = ("LR", "PA", "SI")
    code = ""
    for axis in range(geometry.ndim):
        column = geometry.direction_matrix[:, axis]
        world_axis = int(np.argmax(np.abs(column)))
        code += letters[world_axis][0 if column[world_axis] > 0 else 1]
    return code


def _body_voxels(values: np.ndarray, modality: str) -> np.ndarray:
    if modality == "ct" and values.min() < CT_BODY_THRESHOLD_HU:
        body = values[values > CT_BODY_THRESHOLD_HU]
        return body if body.size else values
    return values


def _case_fingerprint(dataset: Dataset, case_id: str, seed: int) -> CaseFingerprint:
    image = dataset.read_image(case_id)
    landmarks_path = dataset.case(case_id).landmarks_path
    if landmarks_path is None:
        raise LandmarkFileError(
            f"case '{case_id}' has no landmark file", dataset.root / "landmarks"
        )
    landmarks = read_landmarks(
        landmarks_path, geometry=image.geometry, names=dataset.spec.landmarks
    )
    check_landmarks_inside(landmarks_path, landmarks, image.geometry)
    rng = np.random.default_rng(seed)
    samples = []
    for channel, modality in zip(image.array, dataset.spec.modalities, strict=False):
        values = _body_voxels(channel.ravel(), modality)
        take = min(VOXELS_SAMPLED_PER_CASE, values.size)
        samples.append(values[rng.choice(values.size, take, replace=False)].astype(np.float64))
    geometry = reoriented_geometry(
        image.geometry, *canonical_axes(image.geometry)
    )  # as preprocessing sees it
    return CaseFingerprint(
        case_id=case_id,
        shape=list(geometry.shape),
        spacing_mm=list(geometry.spacing_mm),
        orientation=orientation_code(image.geometry),
        points_mm=landmarks.points_mm.tolist(),
        extent_mm=list(geometry.extent_mm),
        intensity_samples=samples,
    )


def _intensity_statistics(samples: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(samples.mean()),
        "std": float(samples.std()),
        "median": float(np.median(samples)),
        "min": float(samples.min()),
        "max": float(samples.max()),
        "percentile_00_5": float(np.percentile(samples, 0.5)),
        "percentile_99_5": float(np.percentile(samples, 99.5)),
    }


def landmark_statistics(points_mm: np.ndarray, extents_mm: np.ndarray, names: list[str]) -> dict:
    """Landmark statistics over cases: ``points_mm`` is ``(N, K, D)`` world mm with NaN = missing.

    - fraction missing per landmark;
    - smallest distance between two landmarks of one case (over all cases), and its median;
    - extent of the landmark cloud relative to the image extent, per world axis (median);
    - per-landmark spread: RMS distance to the landmark's mean after centring every case on
      the centroid of its present landmarks.
    """
    present = ~np.isnan(points_mm).any(axis=2)
    fraction_missing = 1.0 - present.mean(axis=0)
    smallest, cloud_extent = [], []
    for case_points, case_present in zip(points_mm, present, strict=True):
        pts = case_points[case_present]
        if len(pts) >= 2:
            distances = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
            smallest.append(distances[np.triu_indices(len(pts), 1)].min())
        if len(pts):
            cloud_extent.append(pts.max(axis=0) - pts.min(axis=0))
    centroids = np.array(
        [
            np.nanmean(p, axis=0) if m.any() else np.zeros(p.shape[1])
            for p, m in zip(points_mm, present, strict=True)
        ]
    )
    centred = points_mm - centroids[:, None, :]
    with warnings.catch_warnings():  # a landmark present in no case: its mean is NaN, as meant
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_shape = np.nanmean(np.where(present[..., None], centred, np.nan), axis=0)
        deviations = np.linalg.norm(centred - mean_shape[None], axis=-1)
        spread = np.sqrt(np.nanmean(np.where(present, deviations**2, np.nan), axis=0))
    image_extent = np.median(np.sort(extents_mm, axis=1), axis=0)  # axis-order free
    cloud = (
        np.median(np.asarray(cloud_extent), axis=0)
        if cloud_extent
        else np.zeros(points_mm.shape[2])
    )
    return {
        "fraction_missing": dict(zip(names, map(float, fraction_missing), strict=True)),
        "smallest_distance_mm": float(min(smallest)) if smallest else None,
        "median_smallest_distance_mm": float(np.median(smallest)) if smallest else None,
        "cloud_extent_mm": [float(v) for v in cloud],
        "cloud_extent_fraction": float(cloud.max() / image_extent.max()),
        "spread_mm": {
            n: (None if np.isnan(s) else float(s)) for n, s in zip(names, spread, strict=True)
        },
        "median_spread_mm": float(np.nanmedian(spread)) if np.isfinite(spread).any() else None,
    }


def compute_fingerprint(
    dataset: Dataset, case_ids: list[str] | None = None, workers: int = 4
) -> dict:
    """Fingerprint of ``case_ids`` (default: the ``train`` split if any, else every case)."""
    if case_ids is None:
        splits = dataset.splits()
        case_ids = splits.get("train", dataset.case_ids)
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(_case_fingerprint, dataset, c, i) for i, c in enumerate(case_ids)]
        cases = [f.result() for f in progress(futures, description="fingerprint")]
    finally:  # Ctrl-C (or an error) cancels the cases not started instead of reading them all
        pool.shutdown(wait=False, cancel_futures=True)
    spec = dataset.spec
    intensity = [
        _intensity_statistics(np.concatenate([c.intensity_samples[i] for c in cases]))
        for i in range(spec.num_channels)
    ]
    points = np.array([c.points_mm for c in cases], dtype=np.float64)
    return {
        "version": FINGERPRINT_VERSION,
        "dataset": spec.name,
        "spatial_dims": spec.spatial_dims,
        "landmarks": spec.landmarks,
        "modalities": spec.modalities,
        "num_cases": len(cases),
        "case_ids": [c.case_id for c in cases],
        "shapes": [c.shape for c in cases],
        "spacings_mm": [c.spacing_mm for c in cases],
        "orientations": sorted({c.orientation for c in cases}),
        "intensity": intensity,
        "landmark_statistics": landmark_statistics(
            points, np.array([c.extent_mm for c in cases]), spec.landmarks
        ),
        "input_signature": dataset_signature(dataset, case_ids),
    }


def dataset_signature(dataset: Dataset, case_ids: list[str]) -> str:
    """Hash of dataset.json and the size/mtime of every case file: changes when inputs change."""
    digest = hashlib.sha256((dataset.root / "dataset.json").read_bytes())
    for case_id in case_ids:
        case = dataset.case(case_id)
        for path in (case.image_path, case.landmarks_path):
            if path is not None:
                stat = path.stat()
                digest.update(f"{case_id}:{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def write_fingerprint(path: str | Path, fingerprint: dict) -> None:
    atomic_write_text(path, json.dumps(fingerprint, indent=1) + "\n")
