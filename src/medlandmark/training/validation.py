"""Validation during training: real inference on whole cached images, errors in world mm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medlandmark import metrics
from medlandmark.console import info, progress
from medlandmark.heatmaps import decode_heads
from medlandmark.io.geometry import index_to_world, world_to_index
from medlandmark.models import load_run_network
from medlandmark.planning import preprocessed_folder
from medlandmark.preprocessing import CachedCase, cache_folder, load_cached_case
from medlandmark.preprocessing.crops import crop_with_zeros
from medlandmark.records.run import BEST_WEIGHTS, read_run_record
from medlandmark.sliding_window import head_strides, sliding_window_outputs


def predict_cached_case(
    model: nn.Module,
    case: CachedCase,
    patch_size: Sequence[int],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    prediction: str = "full_resolution",
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted landmarks (cache voxel indices, ``(K, D)``) and their heatmap peaks, by the
    ``prediction`` rule (:func:`~medlandmark.sliding_window.head_strides`)."""
    image = torch.from_numpy(np.array(case.image, dtype=np.float32)).to(device)  # writable
    strides = head_strides(model, prediction, len(patch_size))
    heads = sliding_window_outputs(model, image, patch_size, strides, amp_dtype=amp_dtype)
    decoded = decode_heads(heads, strides)
    return decoded.points[0].double().cpu().numpy(), decoded.peak[0].float().cpu().numpy()


@dataclass
class Validation:
    """Errors on the validation cases (world mm; every point's too), the heatmap peak of every
    point and whether it is truly present, and the RMS error per cache axis in voxels (None
    without any point)."""

    mre_mm: float | None
    sdr: dict[str, float]
    n_points: int
    peaks: np.ndarray
    truly_present: np.ndarray
    error_sd_voxels: list[float] | None
    errors_mm: np.ndarray  # (cases, K), NaN where the landmark is not truly present
    points_mm: np.ndarray  # (cases, K, D) the predicted world positions


@torch.no_grad()
def validate(
    model: nn.Module,
    cases: Sequence[CachedCase],
    patch_size: Sequence[int],
    device: torch.device,
    radii_mm: Sequence[float] = metrics.DEFAULT_RADII_MM,
    amp_dtype: torch.dtype | None = None,
    prediction: str = "full_resolution",
) -> Validation:
    """MRE, SDR and per-point peaks over ``cases`` (ground truth from the cache, never fed to the
    prediction); the peaks calibrate the present/missing threshold, and the spread of the
    errors per axis (cache voxels) tells a cascade's fine stage how far off its patches start."""
    was_training = model.training
    model.eval()
    predictions, truths, peaks, offsets = [], [], [], []
    for case in progress(cases, description="validation"):
        predicted, peak = predict_cached_case(
            model, case, patch_size, device, amp_dtype, prediction
        )
        predictions.append(index_to_world(predicted, case.geometry))
        truths.append(index_to_world(case.landmarks_index, case.geometry))
        offsets.append(predicted - case.landmarks_index)
        peaks.append(peak)
    model.train(was_training)
    return _validation(predictions, truths, peaks, offsets, radii_mm)


def _validation(predictions, truths, peaks, offsets, radii_mm) -> Validation:
    """The :class:`Validation` of per-case predicted and true world points ``(K, D)``, peaks
    ``(K,)`` and index offsets ``(K, D)``."""
    offsets = np.concatenate(offsets)
    offsets = offsets[~np.isnan(offsets).any(axis=1)]
    errors = metrics.radial_errors_mm(np.stack(predictions), np.stack(truths))
    statistics = metrics.error_statistics(errors)
    return Validation(
        mre_mm=statistics["mre_mm"],
        sdr=metrics.sdr_by_radius(errors, radii_mm),
        n_points=statistics["n"],
        peaks=np.stack(peaks),
        truly_present=~np.isnan(np.stack(truths)).any(axis=-1),
        error_sd_voxels=np.sqrt(np.mean(offsets**2, axis=0)).tolist() if len(offsets) else None,
        errors_mm=errors,
        points_mm=np.stack(predictions),
    )


FINE_VALIDATION_SEED = 0  # the offsets of the fine patches: the same at every validation


@torch.no_grad()
def validate_fine(
    model: nn.Module,
    cases: Sequence[CachedCase],
    patch_size: Sequence[int],
    device: torch.device,
    offset_sd_voxels: Sequence[float],
    amp_dtype: torch.dtype | None = None,
    prediction: str = "full_resolution",
    centres_index: Sequence[np.ndarray] | None = None,
) -> Validation:
    """A cascade's fine stage validated as prediction uses it: one patch per present landmark,
    centred on the coarse stage's estimate when ``centres_index`` gives them (per case, ``(K,
    D)`` cache voxels: :func:`coarse_estimates_index`), else on the landmark displaced by a
    normal offset of ``offset_sd_voxels`` per axis (the coarse stage's error spread, as in
    training; the same draw at every validation); decoded in that landmark's channel. Truly
    missing landmarks get no patch (NaN)."""
    was_training = model.training
    model.eval()
    strides = head_strides(model, prediction, len(patch_size))
    patch = np.asarray(patch_size)
    predictions, truths, peaks, offsets = [], [], [], []
    for index, case in enumerate(progress(cases, description="validation (fine patches)")):
        truth = case.landmarks_index
        found = np.full(truth.shape, np.nan)
        peak = np.full(len(truth), np.nan)
        for k in np.flatnonzero(~np.isnan(truth).any(axis=1)):
            rng = np.random.default_rng([FINE_VALIDATION_SEED, index, k])
            centre = truth[k] + rng.normal(0.0, 1.0, len(patch)) * np.asarray(offset_sd_voxels)
            if centres_index is not None and np.isfinite(centres_index[index][k]).all():
                centre = centres_index[index][k]
            start = np.round(centre - (patch - 1) / 2).astype(np.int64)
            window = torch.from_numpy(
                np.asarray(crop_with_zeros(case.image, start, patch), dtype=np.float32)
            ).to(device)
            heads = sliding_window_outputs(model, window, patch, strides, amp_dtype=amp_dtype)
            decoded = decode_heads(heads[:, k : k + 1], strides)
            found[k] = decoded.points[0, 0].double().cpu().numpy() + start
            peak[k] = float(decoded.peak[0, 0])
        predictions.append(index_to_world(found, case.geometry))
        truths.append(index_to_world(truth, case.geometry))
        offsets.append(found - truth)
        peaks.append(peak)
    model.train(was_training)
    return _validation(predictions, truths, peaks, offsets, metrics.DEFAULT_RADII_MM)


@torch.no_grad()
def coarse_estimates_index(
    coarse_run: str | Path | None, fine_cases: Sequence[CachedCase], device: torch.device
) -> list[np.ndarray] | None:
    """The coarse stage's estimates of each of ``fine_cases``' landmarks, ``(K, D)`` in that
    case's cache voxels: where prediction centres the fine patches. None without a coarse run
    with best weights, or when its network trained on any of these cases (its estimates there
    would be better than on new images, and the fine stage's errors smaller than in use)."""
    if coarse_run is None or not fine_cases:
        return None
    record = read_run_record(coarse_run)
    unseen = set(record.val_cases or [])
    if not all(c.case_id in unseen for c in fine_cases):
        info(
            f"fine stage: {coarse_run} trained on some of these validation cases; the fine "
            "patches are validated around displaced true landmarks instead of its estimates"
        )
        return None
    if not (Path(coarse_run) / BEST_WEIGHTS).is_file():
        return None
    network = load_run_network(Path(coarse_run), record, "best", device)
    network.eval()
    configuration = record.plan_configuration
    preprocessed = preprocessed_folder(
        record.dataset_path or ".", record.options.get("preprocessed")
    )
    folder = cache_folder(preprocessed, configuration)
    prediction = "full_resolution" if record.settings is None else record.settings.prediction
    centres = []
    for case in progress(fine_cases, description="coarse estimates of the validation cases"):
        coarse_case = load_cached_case(folder, case.case_id)
        index, _ = predict_cached_case(
            network, coarse_case, configuration.patch_size, device, prediction=prediction
        )
        world = index_to_world(index, coarse_case.geometry)
        centres.append(world_to_index(world, case.geometry))
    return centres
