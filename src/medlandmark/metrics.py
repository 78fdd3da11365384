"""Landmark accuracy metrics as plain array functions (no file I/O).

Conventions, written into ``metrics.json`` too:

- radial error: Euclidean distance in world millimetres, only where both the prediction and
  the ground truth have the point (NaN elsewhere);
- SDR (success detection rate) at radius ``r``: percent of evaluated points with error
  ``<= r`` (an error equal to the radius counts as a success), with a tolerance of
  ``SDR_TOLERANCE_MM`` so that float rounding of world coordinates cannot move a point that is
  exactly on the circle (e.g. 20 pixels of 0.1 mm) out of it;
- SD: population standard deviation (``ddof=0``) over all evaluated points, as the
  cephalometric (ISBI 2015) literature reports ``MRE +- SD``;
- missing-landmark confusion with "missing" as the positive class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_RADII_MM = (2.0, 2.5, 3.0, 4.0)  # the cephalometric literature's SDR radii
SDR_TOLERANCE_MM = 1e-6
ERROR_BOUND_LEVEL = 0.9  # the probability an error bound (conformal radius) is calibrated for
SD_DDOF = 0
SD_CONVENTION = "population standard deviation (ddof=0) over all evaluated points"
SDR_RULE = (
    f"percent of evaluated points with radial error <= r (an error equal to r is a success; "
    f"{SDR_TOLERANCE_MM:g} mm tolerance for float rounding)"
)
MISSING_RULE = (
    "missing is the positive class: tp = predicted missing and truly missing, fp = predicted "
    "missing but truly present, fn = predicted present but truly missing, tn = both present"
)


def radius_key(radius_mm: float) -> str:
    """The key of a radius in ``sdr`` objects: ``2`` -> ``"2.0"``, ``2.5`` -> ``"2.5"``."""
    return str(float(radius_mm))


def radial_errors_mm(pred_mm: np.ndarray, gt_mm: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(..., K)`` between ``(..., K, D)`` point arrays; NaN where either
    side is missing (has any NaN coordinate)."""
    pred_mm = np.asarray(pred_mm, dtype=np.float64)
    gt_mm = np.asarray(gt_mm, dtype=np.float64)
    if pred_mm.shape != gt_mm.shape:
        raise ValueError(
            f"prediction shape {pred_mm.shape} differs from ground truth {gt_mm.shape}"
        )
    errors = np.linalg.norm(pred_mm - gt_mm, axis=-1)
    missing = np.isnan(pred_mm).any(axis=-1) | np.isnan(gt_mm).any(axis=-1)
    errors[missing] = np.nan
    return errors


def evaluated(errors_mm: np.ndarray) -> np.ndarray:
    """The finite errors as a flat array (the evaluated points)."""
    errors_mm = np.asarray(errors_mm, dtype=np.float64).ravel()
    return errors_mm[~np.isnan(errors_mm)]


def success_detection_rates(errors_mm: np.ndarray, radii_mm: Sequence[float]) -> np.ndarray:
    """Percent of evaluated points with error ``<= r`` for each radius (NaN if no point)."""
    values = evaluated(errors_mm)
    radii = np.asarray(radii_mm, dtype=np.float64)
    if values.size == 0:
        return np.full(radii.shape, np.nan)
    within = values[None, :] <= radii[:, None] + SDR_TOLERANCE_MM
    return 100.0 * within.mean(axis=1)


def error_statistics(errors_mm: np.ndarray) -> dict[str, float | int | None]:
    """``n``, ``mre_mm``, ``sd_mm`` (population), ``median_mm``, ``max_mm`` of the evaluated
    points; the statistics are None when no point was evaluated."""
    values = evaluated(errors_mm)
    if values.size == 0:
        return {"n": 0, "mre_mm": None, "sd_mm": None, "median_mm": None, "max_mm": None}
    return {
        "n": int(values.size),
        "mre_mm": float(values.mean()),
        "sd_mm": float(values.std(ddof=SD_DDOF)),
        "median_mm": float(np.median(values)),
        "max_mm": float(values.max()),
    }


def missing_confusion(pred_present: np.ndarray, gt_present: np.ndarray) -> dict[str, int]:
    """Counts of the missing-landmark confusion matrix, "missing" being the positive class."""
    pred_missing = ~np.asarray(pred_present, dtype=bool)
    gt_missing = ~np.asarray(gt_present, dtype=bool)
    if pred_missing.shape != gt_missing.shape:
        raise ValueError(f"presence shapes differ: {pred_missing.shape} and {gt_missing.shape}")
    return {
        "tp": int(np.count_nonzero(pred_missing & gt_missing)),
        "fp": int(np.count_nonzero(pred_missing & ~gt_missing)),
        "fn": int(np.count_nonzero(~pred_missing & gt_missing)),
        "tn": int(np.count_nonzero(~pred_missing & ~gt_missing)),
    }


def sdr_curve(
    errors_mm: np.ndarray, max_radius_mm: float, steps: int = 201
) -> tuple[np.ndarray, np.ndarray]:
    """Radii from 0 to ``max_radius_mm`` and the SDR (percent) at each, for plotting."""
    radii = np.linspace(0.0, max_radius_mm, steps)
    return radii, success_detection_rates(errors_mm, radii)


def sdr_by_radius(errors_mm: np.ndarray, radii_mm: Sequence[float]) -> dict[str, float | None]:
    """SDR as the ``{"2.0": percent, ...}`` object of ``metrics.json`` (None without points)."""
    rates = success_detection_rates(errors_mm, radii_mm)
    return {radius_key(r): _number(v) for r, v in zip(radii_mm, rates, strict=True)}


def summarize(
    errors_mm: np.ndarray,
    pred_present: np.ndarray,
    gt_present: np.ndarray,
    case_ids: Sequence[str],
    names: Sequence[str],
    radii_mm: Sequence[float],
    worst: int = 5,
) -> dict:
    """All metrics of ``(N, K)`` errors and presence masks, as the ``metrics.json`` object
    (without the inputs' paths)."""
    errors_mm = np.asarray(errors_mm, dtype=np.float64).reshape(len(case_ids), len(names))
    pred_present = np.asarray(pred_present, dtype=bool).reshape(errors_mm.shape)
    gt_present = np.asarray(gt_present, dtype=bool).reshape(errors_mm.shape)
    overall = error_statistics(errors_mm)
    per_landmark = {
        name: {
            **error_statistics(errors_mm[:, k]),
            "sdr": sdr_by_radius(errors_mm[:, k], radii_mm),
            "missing": missing_confusion(pred_present[:, k], gt_present[:, k]),
        }
        for k, name in enumerate(names)
    }
    per_case = [error_statistics(errors_mm[i]) for i in range(len(case_ids))]
    return {
        "n_cases": len(case_ids),
        "n_points": overall["n"],
        "n_landmarks": len(names),
        "units": "mm",
        "mre_mm": overall["mre_mm"],
        "sd_mm": overall["sd_mm"],
        "median_mm": overall["median_mm"],
        "max_mm": overall["max_mm"],
        "sd_convention": SD_CONVENTION,
        "radii_mm": [float(r) for r in radii_mm],
        "sdr": sdr_by_radius(errors_mm, radii_mm),
        "sdr_rule": SDR_RULE,
        "per_landmark": per_landmark,
        "per_case_mre_mm": {c: s["mre_mm"] for c, s in zip(case_ids, per_case, strict=True)},
        "worst_cases": worst_cases(errors_mm, case_ids, names, worst),
        "missing": missing_confusion(pred_present, gt_present),
        "missing_rule": MISSING_RULE,
    }


def worst_cases(
    errors_mm: np.ndarray, case_ids: Sequence[str], names: Sequence[str], count: int = 5
) -> list[dict]:
    """The ``count`` cases with the highest MRE, each with its largest error and landmark."""
    rows = []
    for i, case_id in enumerate(case_ids):
        stats = error_statistics(errors_mm[i])
        if stats["n"] == 0:
            continue
        k = int(np.nanargmax(errors_mm[i]))
        rows.append(
            {
                "case_id": case_id,
                "mre_mm": stats["mre_mm"],
                "max_mm": stats["max_mm"],
                "worst_landmark": names[k],
                "n_points": stats["n"],
            }
        )
    rows.sort(key=lambda row: (-row["mre_mm"], row["case_id"]))
    return rows[:count]


BAD_CASE_MRE_MM = 5.0
BAD_CASE_LOST_SHARE = 0.5
BAD_CASE_RULE = (
    f"a bad case has an MRE above {BAD_CASE_MRE_MM:g} mm, or more than "
    f"{BAD_CASE_LOST_SHARE:.0%} of its truly present landmarks reported missing"
)


def bad_cases(
    errors_mm: np.ndarray, pred_present: np.ndarray, gt_present: np.ndarray
) -> np.ndarray:
    """``(N,)`` True for the cases :data:`BAD_CASE_RULE` calls bad, from ``(N, K)`` arrays."""
    with np.errstate(invalid="ignore"):
        mre = np.array([np.nanmean(row) if np.isfinite(row).any() else 0.0 for row in errors_mm])
    truly = gt_present.sum(axis=1)
    lost = (gt_present & ~pred_present).sum(axis=1) / np.maximum(truly, 1)
    return (mre > BAD_CASE_MRE_MM) | (lost > BAD_CASE_LOST_SHARE)


def verdict_separation(bad: np.ndarray, flagged: np.ndarray) -> dict:
    """How well flags (doubtful or failed) pick out the bad cases: the share of bad cases
    flagged and the share of flagged cases that were good (None where there are none)."""
    bad, flagged = np.asarray(bad, dtype=bool), np.asarray(flagged, dtype=bool)
    return {
        "bad_cases": int(bad.sum()),
        "flagged_cases": int(flagged.sum()),
        "bad_flagged_percent": _number(100.0 * (bad & flagged).sum() / bad.sum())
        if bad.any()
        else None,
        "flagged_good_percent": _number(100.0 * (flagged & ~bad).sum() / flagged.sum())
        if flagged.any()
        else None,
        "bad_case_rule": BAD_CASE_RULE,
    }


def conformal_radius_mm(errors_mm: np.ndarray, level: float = ERROR_BOUND_LEVEL) -> float | None:
    """Split conformal radius: the ``ceil((n + 1) level)``-th smallest of the ``n`` finite
    validation errors, so that a new point's error falls within it with probability at least
    ``level`` (exchangeable cases); None when ``n`` is too small for that rank."""
    values = np.sort(evaluated(errors_mm))
    rank = math.ceil((values.size + 1) * level)
    return float(values[rank - 1]) if 0 < rank <= values.size else None


def conformal_radii_mm(
    errors_mm: np.ndarray, level: float = ERROR_BOUND_LEVEL
) -> list[float] | None:
    """One radius per landmark (column) of ``(cases, K)`` validation errors; a landmark with
    too few validation points takes the radius of all points together (None when even those
    are too few)."""
    errors_mm = np.asarray(errors_mm, dtype=np.float64)
    pooled = conformal_radius_mm(errors_mm, level)
    if pooled is None:
        return None
    radii = [conformal_radius_mm(errors_mm[:, k], level) for k in range(errors_mm.shape[1])]
    return [pooled if r is None else r for r in radii]


def bound_coverage(errors_mm: np.ndarray, bounds_mm: np.ndarray) -> float | None:
    """Percent of the points with both an error and a bound whose error is within the bound."""
    errors_mm, bounds_mm = np.broadcast_arrays(
        np.asarray(errors_mm, dtype=np.float64), np.asarray(bounds_mm, dtype=np.float64)
    )
    usable = np.isfinite(errors_mm) & np.isfinite(bounds_mm)
    if not usable.any():
        return None
    return float(100.0 * np.mean(errors_mm[usable] <= bounds_mm[usable] + SDR_TOLERANCE_MM))


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
