"""Validation during training: real inference on whole cached images, errors in world mm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medlandmark import metrics
from medlandmark.console import progress
from medlandmark.heatmaps import decode_heads
from medlandmark.io.geometry import index_to_world
from medlandmark.preprocessing import CachedCase
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
