"""Preprocessing: transpose, normalise and resample every case into a memory-mappable cache.

Cache layout, one folder per distinct data spacing (``data_identifier`` in the plan)::

    PREPROCESSED/<data_identifier>/<case>.npy    float16 (C, *shape), normalised voxels
    PREPROCESSED/<data_identifier>/<case>.json   geometry of the array, landmarks in its
                                                 voxel indices, and the input signature

The JSON is written last and is the completion marker: a case without it is not in the cache.
An up-to-date case (same signature) is skipped; a changed input is redone.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlandmark.console import info, progress
from medlandmark.datasets.check import check_landmarks_inside
from medlandmark.datasets.dataset import Dataset
from medlandmark.errors import ImageError, LandmarkFileError, MedlandmarkError, listed
from medlandmark.io.files import atomic_path, atomic_write_text, remove_partials
from medlandmark.io.geometry import (
    Geometry,
    canonical_axes,
    reoriented_geometry,
    resampled_geometry,
    transposed_geometry,
    world_to_index,
)
from medlandmark.io.images import ImageData, read_image
from medlandmark.io.landmarks import read_landmarks
from medlandmark.planning import load_plan, preprocessed_folder
from medlandmark.planning.planner import ANISOTROPY_THRESHOLD
from medlandmark.preprocessing.normalize import normalize_image
from medlandmark.preprocessing.resample import resample_image, resampled_shape
from medlandmark.records.plan import Configuration, Plan

PREPROCESS_VERSION = 1
CACHE_DTYPE = np.float16


@dataclass
class CachedCase:
    """A preprocessed case: memory-mapped voxels, their geometry, landmarks in their indices."""

    case_id: str
    image: np.ndarray
    geometry: Geometry
    source_geometry: Geometry
    landmark_names: list[str]
    landmarks_index: np.ndarray


def preprocess_image(
    image: ImageData, plan: Plan, configuration: Configuration
) -> tuple[np.ndarray, Geometry]:
    """Normalised, transposed and resampled float32 voxels ``(C, *shape)`` and their geometry."""
    if image.ndim != plan.spatial_dims:
        raise MedlandmarkError(
            f"image is {image.ndim}D, the plan is for {plan.spatial_dims}D images"
        )
    if image.channels != len(plan.normalization):
        raise MedlandmarkError(
            f"image has {image.channels} channels, the plan expects {len(plan.normalization)}"
        )
    array, geometry = normalize_image(image.array, plan.normalization), image.geometry
    if plan.reorient:  # plans written before reorientation existed: as they were
        array, geometry = reoriented_array(array, geometry)
    axes = plan.transpose_forward
    array = array.transpose(0, *[a + 1 for a in axes])
    geometry = transposed_geometry(geometry, axes)
    target = configuration.spacing_mm
    shape = resampled_shape(geometry.shape, geometry.spacing_mm, target)
    linear_axes = [a for a, s in enumerate(target) if s > ANISOTROPY_THRESHOLD * min(target)]
    return resample_image(array, shape, linear_axes), resampled_geometry(geometry, shape)


def reoriented_array(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Geometry]:
    """Voxels ``(C, *shape)`` permuted and flipped into the canonical orientation
    (:func:`~medlandmark.io.geometry.canonical_axes`), losslessly, and their geometry."""
    axes, flips = canonical_axes(geometry)
    array = array.transpose(0, *[a + 1 for a in axes])
    array = np.flip(array, [j + 1 for j, flip in enumerate(flips) if flip])
    return array, reoriented_geometry(geometry, axes, flips)


def case_signature(
    image_path: Path, landmarks_path: Path | None, plan: Plan, configuration: Configuration
) -> str:
    """Changes whenever the inputs or the preprocessing decisions for a case change."""
    parts: dict = {
        "version": PREPROCESS_VERSION,
        "normalization": [n.model_dump(mode="json") for n in plan.normalization],
        "transpose": plan.transpose_forward,
        "spacing_mm": configuration.spacing_mm,
        "reorient": plan.reorient,
    }
    for key, path in (("image", image_path), ("landmarks", landmarks_path)):
        if path is not None:
            stat = path.stat()
            parts[key] = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_folder(preprocessed: Path, configuration: Configuration) -> Path:
    """The cache of ``configuration``'s spacing in a preprocessed folder."""
    return Path(preprocessed) / configuration.data_identifier


def load_cached_case(folder: str | Path, case_id: str) -> CachedCase:
    """Open a cached case (voxels memory-mapped); a case without its JSON marker is absent."""
    folder = Path(folder)
    meta_path = folder / f"{case_id}.json"
    if not meta_path.is_file():
        raise MedlandmarkError(
            f"case '{case_id}' is not in the cache: run 'medlandmark preprocess'", folder
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        image = np.load(folder / f"{case_id}.npy", mmap_mode="r")
        points = np.array(
            [[np.nan] * len(meta["shape"]) if p is None else p for p in meta["landmarks_index"]],
            dtype=np.float64,
        )
        case = CachedCase(
            case_id,
            image,
            Geometry.from_dict(meta["geometry"]),
            Geometry.from_dict(meta["source_geometry"]),
            meta["landmark_names"],
            points.reshape(len(meta["landmark_names"]), len(meta["shape"])),
        )
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        MedlandmarkError,
    ) as error:  # ValueError: bad JSON
        raise MedlandmarkError(
            f"cached case '{case_id}' is damaged ({type(error).__name__}: {error}); delete its .json "
            "and .npy and run 'medlandmark preprocess' again",
            meta_path,
        ) from None
    if tuple(case.image.shape[1:]) != case.geometry.shape:
        raise MedlandmarkError(
            f"cached case '{case_id}' is damaged (voxels {case.image.shape[1:]} for a geometry of "
            f"{case.geometry.shape}); run 'medlandmark preprocess' again",
            meta_path,
        )
    return case


def _preprocess_case(
    case_id: str,
    image_path: Path,
    landmarks_path: Path | None,
    spacing_xy_mm,
    names: list[str],
    plan: Plan,
    configuration: Configuration,
    folder: Path,
) -> str:
    """Write one case into the cache unless it is up to date; returns 'done' or 'skipped'."""
    signature = case_signature(image_path, landmarks_path, plan, configuration)
    meta_path = folder / f"{case_id}.json"
    if meta_path.is_file() and (folder / f"{case_id}.npy").is_file():
        try:
            if json.loads(meta_path.read_text(encoding="utf-8")).get("signature") == signature:
                return "skipped"
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    meta_path.unlink(missing_ok=True)  # the case is incomplete from here until the marker is back
    for path in (folder / f"{case_id}.npy", meta_path):
        remove_partials(path)  # what a killed run of this case left
    image = read_image(image_path, spacing_xy_mm=spacing_xy_mm)
    try:
        array, geometry = preprocess_image(image, plan, configuration)
    except MedlandmarkError as error:
        raise ImageError(error.detail, image_path) from None
    index = np.full((len(names), geometry.ndim), np.nan)
    if landmarks_path is not None:
        landmarks = read_landmarks(landmarks_path, geometry=image.geometry, names=names)
        check_landmarks_inside(landmarks_path, landmarks, image.geometry)
        index = world_to_index(landmarks.points_mm, geometry)
    with atomic_path(folder / f"{case_id}.npy") as tmp, tmp.open("wb") as handle:
        np.save(handle, array.astype(CACHE_DTYPE))
    meta = {
        "version": PREPROCESS_VERSION,
        "case_id": case_id,
        "signature": signature,
        "configuration": configuration.name,
        "shape": list(geometry.shape),
        "channels": int(array.shape[0]),
        "dtype": np.dtype(CACHE_DTYPE).name,
        "geometry": geometry.to_dict(),
        "source_geometry": image.geometry.to_dict(),
        "landmark_names": names,
        "landmarks_index": [None if np.isnan(p).any() else [float(v) for v in p] for p in index],
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    return "done"


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def preprocess_dataset(
    dataset_root: str | Path,
    preprocessed: str | Path | None = None,
    configurations: list[str] | None = None,
    workers: int = 2,
) -> dict[str, dict[str, int]]:
    """Preprocess every case for the given configurations (default: all in the plan).

    Returns per data folder how many cases were written and skipped.
    """
    dataset = Dataset(dataset_root)
    folder = preprocessed_folder(dataset_root, preprocessed)
    plan = load_plan(folder)
    names = configurations or list(plan.configurations)
    unknown = [n for n in names if n not in plan.configurations]
    if unknown:
        planned = list(plan.configurations)
        raise MedlandmarkError(f"no configuration {unknown} in the plan (has {planned})", folder)
    unlabelled = [c.case_id for c in dataset.cases if c.landmarks_path is None]
    if unlabelled:  # check and plan refuse these too; cached as all-missing they would train
        raise LandmarkFileError(
            f"no landmark file for case(s) {listed(unlabelled)}: add them, or remove the cases "
            "(then plan again)",
            dataset.root / "landmarks",
        )
    summary: dict[str, dict[str, int]] = {}
    for name in names:
        configuration = plan.configurations[name]
        out = cache_folder(folder, configuration)
        if out.name in summary:
            continue
        out.mkdir(parents=True, exist_ok=True)
        jobs = [
            (
                c.case_id,
                c.image_path,
                c.landmarks_path,
                dataset.spec.spacing_mm,
                dataset.spec.landmarks,
                plan,
                configuration,
                out,
            )
            for c in dataset.cases
        ]
        counts = {"done": 0, "skipped": 0}
        for status in _run_jobs(jobs, workers, f"preprocess {out.name}"):
            counts[status] += 1
        summary[out.name] = counts
        info(f"{out}: {counts['done']} cases written, {counts['skipped']} up to date")
    return summary


def _run_jobs(jobs: list[tuple], workers: int, description: str):
    if workers <= 1 or len(jobs) <= 1:
        for job in progress(jobs, description=description):
            yield _preprocess_case(*job)
        return
    context = multiprocessing.get_context("spawn")
    workers = min(workers, os.cpu_count() or 1, len(jobs))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
        futures = [pool.submit(_preprocess_case, *job) for job in jobs]
        for future in progress(as_completed(futures), total=len(futures), description=description):
            yield future.result()
