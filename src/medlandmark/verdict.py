"""A verdict for every predicted case: ``ok``, ``doubtful`` or ``failed``, with the reasons.

The evidence is what prediction already has (:class:`CaseEvidence`): the landmarks' confidences,
the share reported missing although the shape model places them inside the image, how well the
found constellation fits the training shape (its residual, the landmarks that disagree, and
whether the fit mirrors it), and points outside the image. Training calibrates the thresholds on
the run's validation cases (:func:`verdict_thresholds`, kept in ``run.json``); :func:`judge`
compares a case with them. Without calibration only the rules that need none apply: nothing
found, no plausible constellation, a mirrored one, points outside the image.

Rules (fixed before any test split was seen): with the validation cases' median ``m`` and robust
spread ``s`` (1.4826 x the median absolute deviation, floored), a case is doubtful below
``m - 4 s`` of mean confidence and failed below ``m - 8 s``; doubtful above ``m + 4 s`` of shape
residual; doubtful when the share of landmarks missing, or disagreeing with the shape, exceeds
the highest validation share by 0.1 (failed: missing by 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medlandmark.io.geometry import Geometry
from medlandmark.io.landmark_formats import CaseVerdict
from medlandmark.records.run import VerdictThresholds
from medlandmark.shape_model import ExpectedFit, ShapeModel

DOUBTFUL_SPREADS = 4.0
FAILED_SPREADS = 8.0
MAD_TO_SD = 1.4826  # a normal distribution's SD per median absolute deviation
MIN_CONFIDENCE_SPREAD = 0.02  # confidences are on a 0-1 scale
MIN_RESIDUAL_SPREAD = 0.1  # of the typical shape residual
SHARE_MARGIN_DOUBTFUL = 0.1
SHARE_MARGIN_FAILED = 0.5
NAMES_SHOWN = 5


@dataclass(frozen=True)
class CaseEvidence:
    """What a prediction says about its own reliability.

    ``expected_inside``: the landmarks the shape fit places inside the image (all when there is
    no fit); ``mean_confidence`` and ``missing_share`` are over those; ``shape_rms_mm`` is the
    fit's residual (None: no fit), ``disagreeing`` the present landmarks the fit does not agree
    with, ``mirrored`` whether the fit mirrors the training shape, ``rotation_deg`` how far it
    turns it (``turned``: beyond the shape model's limit), ``outside`` the present landmarks
    outside the image."""

    mean_confidence: float
    missing_share: float
    present_count: int
    fit_needed: int
    shape_rms_mm: float | None
    disagreeing: tuple[int, ...]
    disagreeing_share: float
    mirrored: bool
    outside: tuple[int, ...]
    rotation_deg: float | None = None
    turned: bool = False

    @property
    def fitted(self) -> bool:
        return self.shape_rms_mm is not None


def case_evidence(
    confidence: np.ndarray,
    present: np.ndarray,
    points_mm: np.ndarray,
    shape_model: ShapeModel | None,
    geometry: Geometry,
) -> CaseEvidence:
    """The evidence of one case from its landmarks ``(K, D)`` (world mm), their confidences and
    which of them passed the presence threshold."""
    present = np.asarray(present, dtype=bool)
    fit = None if shape_model is None else shape_model.expected(points_mm, present)
    return evidence_of_fit(confidence, present, points_mm, shape_model, fit, geometry)


def evidence_of_fit(
    confidence: np.ndarray,
    present: np.ndarray,
    points_mm: np.ndarray,
    shape_model: ShapeModel | None,
    fit: ExpectedFit | None,
    geometry: Geometry,
) -> CaseEvidence:
    """:func:`case_evidence` with the shape model's fit to the present landmarks already made
    (None: no plausible fit, or no shape model)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    inside = np.ones(len(present), dtype=bool)
    disagreeing = np.zeros(len(present), dtype=bool)
    if fit is not None:
        depth = geometry.depth_inside_mm(fit.expected_mm)
        inside = ~(np.isfinite(depth) & (depth < fit.rms_mm))
        disagreeing = present & inside & ~np.isin(np.arange(len(present)), fit.inliers)
    found = present & inside
    outside = found & ~geometry.contains_world(points_mm)
    mirrored = fit is not None and shape_model.mirrors(fit)
    turned = fit is not None and shape_model.turns_too_far(fit)
    return CaseEvidence(
        mean_confidence=float(np.mean(confidence[inside])) if inside.any() else float("nan"),
        missing_share=float(np.mean(~present[inside])) if inside.any() else 0.0,
        present_count=int(present.sum()),
        fit_needed=0 if shape_model is None else shape_model.minimum_points,
        shape_rms_mm=None if fit is None else fit.rms_mm,
        disagreeing=tuple(int(k) for k in np.flatnonzero(disagreeing)),
        disagreeing_share=float(disagreeing.sum() / max(found.sum(), 1)),
        mirrored=bool(mirrored),
        outside=tuple(int(k) for k in np.flatnonzero(outside)),
        rotation_deg=None if fit is None else fit.rotation_deg,
        turned=bool(turned),
    )


def verdict_thresholds(evidence: Sequence[CaseEvidence]) -> VerdictThresholds | None:
    """Thresholds from the validation cases' evidence (None without a case that has any)."""
    confidences = np.array([e.mean_confidence for e in evidence if np.isfinite(e.mean_confidence)])
    if not len(confidences):
        return None
    typical, spread = _centre_and_spread(confidences, MIN_CONFIDENCE_SPREAD)
    residuals = np.array([e.shape_rms_mm for e in evidence if e.shape_rms_mm is not None])
    rms_typical = rms_doubtful = None
    if len(residuals):
        rms_typical, rms_spread = _centre_and_spread(residuals, 0.0)
        rms_spread = max(rms_spread, MIN_RESIDUAL_SPREAD * rms_typical)
        rms_doubtful = rms_typical + DOUBTFUL_SPREADS * rms_spread
    missing_high = max(e.missing_share for e in evidence)
    return VerdictThresholds(
        cases=len(evidence),
        confidence_typical=typical,
        confidence_doubtful=max(typical - DOUBTFUL_SPREADS * spread, 0.0),
        confidence_failed=max(typical - FAILED_SPREADS * spread, 0.0),
        shape_rms_typical_mm=rms_typical,
        shape_rms_doubtful_mm=rms_doubtful,
        disagreeing_share_doubtful=min(
            max(e.disagreeing_share for e in evidence) + SHARE_MARGIN_DOUBTFUL, 1.0
        ),
        missing_share_doubtful=min(missing_high + SHARE_MARGIN_DOUBTFUL, 1.0),
        missing_share_failed=min(missing_high + SHARE_MARGIN_FAILED, 1.0),
    )


def combined_thresholds(thresholds: Sequence[VerdictThresholds]) -> VerdictThresholds | None:
    """One set for an ensemble: each threshold averaged over its runs (None without any)."""
    if not thresholds:
        return None
    fields = {}
    for name in VerdictThresholds.model_fields:
        values = [getattr(t, name) for t in thresholds]
        if any(v is None for v in values):
            fields[name] = None
        elif name == "cases":
            fields[name] = int(sum(values))
        else:
            fields[name] = float(np.mean(values))
    return VerdictThresholds(**fields)


def judge(
    evidence: CaseEvidence, thresholds: VerdictThresholds | None, names: Sequence[str]
) -> CaseVerdict:
    """The case's status and the reasons for it (failed reasons first)."""
    failed, doubtful = [], []
    e, t = evidence, thresholds
    if e.present_count == 0:
        failed.append("no landmark found")
    elif e.fit_needed and not e.fitted and e.present_count >= e.fit_needed:
        failed.append(
            f"the {e.present_count} landmarks found fit no plausible shape of the training cases"
        )
    if e.mirrored:
        failed.append(
            "the landmarks found form the mirror image of the training shape (a flipped image?)"
        )
    if e.turned and not e.mirrored:
        failed.append(
            f"the landmarks found are turned {e.rotation_deg:.0f} degrees from the training "
            "shape, more than any training case (a rotated image?)"
        )
    if e.outside:
        doubtful.append(f"outside the image: {_names(e.outside, names)}")
    if t is not None:
        confidence = f"mean confidence {e.mean_confidence:.2f} (typical {t.confidence_typical:.2f})"
        if e.mean_confidence < t.confidence_failed:
            failed.append(f"{confidence}, far below the validation cases'")
        elif e.mean_confidence < t.confidence_doubtful:
            doubtful.append(f"{confidence}, below the validation cases'")
        missing = f"{e.missing_share:.0%} of the landmarks in view reported missing"
        if e.missing_share > t.missing_share_failed:
            failed.append(missing)
        elif e.missing_share > t.missing_share_doubtful:
            doubtful.append(missing)
        if (
            e.shape_rms_mm is not None
            and t.shape_rms_doubtful_mm is not None
            and e.shape_rms_mm > t.shape_rms_doubtful_mm
        ):
            doubtful.append(
                f"the landmarks fit the training shape loosely ({e.shape_rms_mm:.1f} mm; "
                f"typical {t.shape_rms_typical_mm:.1f} mm)"
            )
        if e.disagreeing and e.disagreeing_share > t.disagreeing_share_doubtful:
            doubtful.append(f"off the training shape: {_names(e.disagreeing, names)}")
    status = "failed" if failed else "doubtful" if doubtful else "ok"
    return CaseVerdict(status, tuple(failed + doubtful))


def _centre_and_spread(values: np.ndarray, floor: float) -> tuple[float, float]:
    """Median and robust spread (scaled median absolute deviation, at least ``floor``)."""
    centre = float(np.median(values))
    return centre, max(MAD_TO_SD * float(np.median(np.abs(values - centre))), floor)


def _names(indices: Sequence[int], names: Sequence[str]) -> str:
    shown = [names[k] for k in indices[:NAMES_SHOWN]]
    more = len(indices) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
