"""The landmarks' constellation: where each landmark should be, given the others.

Training fits a :class:`ShapeModel` to the training cases' landmarks (world mm): a reference
shape (generalised affine alignment, missing landmarks allowed), the residual of an affine fit
of each case to it, and the range of the affine maps' singular values. At prediction the
confidently found landmarks are matched to the reference by a robust (RANSAC) affine fit that
keeps to that range, and every landmark gets an expected position. A landmark expected outside
the image, or inside by less than the fit's own RMS residual, is one the field of view has cut
off: reported missing whatever its heatmap shows (a network leaves a peak at the border, or on a
look-alike, for a landmark it cannot see). The predictor also re-decodes a landmark found far
from its expected position near that position (:func:`medlandmark.inference.predictor.shape_outliers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medlandmark.io.geometry import Geometry

ALIGNMENT_ROUNDS = 10
INLIER_RMS_FACTOR = 4.0  # an inlier is within this many training residual RMS of its expected place
SINGULAR_VALUE_SLACK = 1.1  # the fitted map may scale this much beyond the training range
ROTATION_SLACK_DEG = 20.0  # the fitted map may turn this much beyond the most turned training case
RANSAC_TRIALS = 500
MIN_CASES = 3


@dataclass(frozen=True)
class ExpectedFit:
    """Expected positions ``(K, D)`` in world mm, the landmarks that agreed with them, the
    fit's RMS residual over those in mm, and the fitted map's handedness (+1 keeps the
    reference's, -1 mirrors it)."""

    expected_mm: np.ndarray
    inliers: np.ndarray
    rms_mm: float
    handedness: int = 1
    rotation_deg: float = 0.0  # how far the fitted map turns the reference
    matrix: np.ndarray | None = None  # the affine map (D + 1, D) from the reference to the case


@dataclass(frozen=True)
class ShapeModel:
    """Reference shape ``(K, D)`` (mm; NaN for a landmark never seen), the distance within which
    a found landmark agrees with the fit, the allowed singular values of the affine map, and the
    handedness every training case had (+1 or -1; 0 when they differed or it is unknown), and
    how far a fit may turn the reference (the most turned training case plus a slack; None: no
    limit known), and the training cases' typical orientation: the mean orthogonal map ``(D, D)``
    from the reference to their preprocessed arrays' axes (mm; None: not known)."""

    reference_mm: np.ndarray
    inlier_mm: float
    singular_values: tuple[float, float]
    handedness: int = 0
    rotation_limit_deg: float | None = None
    typical_orientation: np.ndarray | None = None

    @property
    def minimum_points(self) -> int:
        """Agreeing landmarks a fit needs: one more than an affine map's minimal sample."""
        return self.reference_mm.shape[1] + 2

    def to_dict(self) -> dict:
        return {
            "reference_mm": [None if np.isnan(p).any() else p.tolist() for p in self.reference_mm],
            "inlier_mm": self.inlier_mm,
            "singular_values": list(self.singular_values),
            "handedness": self.handedness,
            "rotation_limit_deg": self.rotation_limit_deg,
            "typical_orientation": None
            if self.typical_orientation is None
            else self.typical_orientation.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ShapeModel:
        ndim = len(next(p for p in data["reference_mm"] if p is not None))
        reference = np.array(
            [[np.nan] * ndim if p is None else p for p in data["reference_mm"]], dtype=np.float64
        )
        low, high = data["singular_values"]
        handedness = int(data.get("handedness", 0))
        limit = data.get("rotation_limit_deg")
        typical = data.get("typical_orientation")
        return cls(
            reference,
            float(data["inlier_mm"]),
            (float(low), float(high)),
            handedness,
            None if limit is None else float(limit),
            None if typical is None else np.array(typical, dtype=np.float64),
        )

    def expected(
        self, points_mm: np.ndarray, usable: np.ndarray, seed: int = 0
    ) -> ExpectedFit | None:
        """Expected positions from the ``usable`` found ``points_mm`` ``(K, D)``, or None when
        fewer than :attr:`minimum_points` of them agree on one plausible affine map."""
        candidates = np.flatnonzero(
            usable & np.isfinite(points_mm).all(axis=1) & np.isfinite(self.reference_mm).all(axis=1)
        )
        if len(candidates) < self.minimum_points:
            return None
        inliers = self._consensus(points_mm, candidates, np.random.default_rng(seed))
        if inliers is None:
            return None
        for _ in range(3):  # refit on the agreeing landmarks until the set settles
            matrix = affine_fit(self.reference_mm[inliers], points_mm[inliers])
            residual = np.linalg.norm(
                apply_affine(matrix, self.reference_mm[candidates]) - points_mm[candidates], axis=1
            )
            agreeing = candidates[residual < self.inlier_mm]
            if len(agreeing) < self.minimum_points:
                return None
            if np.array_equal(agreeing, inliers):
                break
            inliers = agreeing
        residual = np.linalg.norm(
            apply_affine(matrix, self.reference_mm[inliers]) - points_mm[inliers], axis=1
        )
        return ExpectedFit(
            apply_affine(matrix, self.reference_mm),
            inliers,
            float(np.sqrt(np.mean(residual**2))),
            handedness_of(matrix),
            rotation_deg_of(matrix),
            matrix,
        )

    def mirrors(self, fit: ExpectedFit) -> bool:
        """Whether ``fit`` mirrors the shape every training case had."""
        return self.handedness != 0 and fit.handedness != self.handedness

    def turns_too_far(self, fit: ExpectedFit) -> bool:
        """Whether ``fit`` turns the reference beyond the most turned training case (+ slack)."""
        return self.rotation_limit_deg is not None and fit.rotation_deg > self.rotation_limit_deg

    def plausible(self, fit: ExpectedFit | None) -> bool:
        """A fit exists, neither mirrors the training shape nor turns beyond the training cases."""
        return fit is not None and not (self.mirrors(fit) or self.turns_too_far(fit))

    def window_direction(self, fit: ExpectedFit | None) -> np.ndarray | None:
        """The direction matrix (columns: world axes of the window's array axes) of a window that
        shows the anatomy ``fit`` found as the training arrays typically did: the fit's rotation
        undone, then the typical orientation applied. None without a plausible fit or a typical
        orientation (then windows keep the image's axes)."""
        if self.typical_orientation is None or not self.plausible(fit) or fit.matrix is None:
            return None
        turn = orthogonal_part(fit.matrix[: self.reference_mm.shape[1]])
        if np.linalg.det(turn) < 0:
            return None
        return turn.T @ self.typical_orientation

    def cut_off(self, points_mm: np.ndarray, usable: np.ndarray, geometry: Geometry) -> np.ndarray:
        """``(K,)`` True for landmarks the image's field of view has cut off: expected outside
        it, or inside by less than the fit's RMS residual. All False when no fit is possible."""
        return cut_off_by(self.expected(points_mm, usable), geometry, len(points_mm))

    def _consensus(
        self, points_mm: np.ndarray, candidates: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray | None:
        """The largest set of candidates that one plausible affine map (from a minimal sample)
        puts within :attr:`inlier_mm`; ties go to the smaller summed residual."""
        ndim = self.reference_mm.shape[1]
        low, high = self.singular_values
        best, best_score = None, None
        for _ in range(RANSAC_TRIALS):
            sample = rng.choice(candidates, ndim + 1, replace=False)
            matrix = affine_fit(self.reference_mm[sample], points_mm[sample])
            if matrix is None:
                continue
            values = np.linalg.svd(matrix[:ndim], compute_uv=False)
            if values.min() < low or values.max() > high:
                continue
            residual = np.linalg.norm(
                apply_affine(matrix, self.reference_mm[candidates]) - points_mm[candidates], axis=1
            )
            agreeing = residual < self.inlier_mm
            score = (int(agreeing.sum()), -float(np.minimum(residual, self.inlier_mm).sum()))
            if best_score is None or score > best_score:
                best, best_score = candidates[agreeing], score
        return best if best is not None and len(best) >= self.minimum_points else None


def cut_off_by(fit: ExpectedFit | None, geometry: Geometry, count: int) -> np.ndarray:
    """``(count,)`` True for landmarks that ``fit`` expects outside ``geometry``'s field of view
    or inside it by less than its RMS residual; all False without a fit."""
    if fit is None:
        return np.zeros(count, dtype=bool)
    depth = geometry.depth_inside_mm(fit.expected_mm)
    return np.isfinite(depth) & (depth < fit.rms_mm)


def affine_fit(source_mm: np.ndarray, target_mm: np.ndarray) -> np.ndarray | None:
    """The least-squares affine map ``(D + 1, D)`` taking ``source`` to ``target`` points
    (``[x, 1] @ matrix``), or None when the source points span less than ``D`` dimensions."""
    design = np.c_[source_mm, np.ones(len(source_mm))]
    if np.linalg.matrix_rank(design) < design.shape[1]:
        return None
    matrix, *_ = np.linalg.lstsq(design, target_mm, rcond=None)
    return matrix


def handedness_of(matrix: np.ndarray) -> int:
    """+1 when an affine map from :func:`affine_fit` keeps orientation, -1 when it mirrors."""
    ndim = matrix.shape[1]
    return 1 if np.linalg.det(matrix[:ndim]) >= 0 else -1


def rotation_deg_of(matrix: np.ndarray) -> float:
    """The angle (degrees, 0-180) of the rotation in an affine map from :func:`affine_fit`: its
    linear part's nearest rotation (or rotation times a mirror), whatever the scaling."""
    ndim = matrix.shape[1]
    rotation = orthogonal_part(matrix[:ndim].T)
    if np.linalg.det(rotation) < 0:  # a mirror: measure the rotation that follows it
        rotation = rotation @ np.diag([-1.0] + [1.0] * (ndim - 1))
    cosine = (np.trace(rotation) - (ndim - 2)) / 2
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def orthogonal_part(linear: np.ndarray) -> np.ndarray:
    """The orthogonal matrix nearest to ``linear`` ``(D, D)`` (its polar factor)."""
    u, _, vt = np.linalg.svd(linear)
    return u @ vt


def mean_orthogonal(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """The orthogonal matrix nearest to the mean of orthogonal ``matrices`` of one handedness
    (the chordal mean), with that handedness."""
    u, _, vt = np.linalg.svd(np.mean(matrices, axis=0))
    if np.sign(np.linalg.det(u @ vt)) != np.sign(np.linalg.det(matrices[0])):
        u[:, -1] *= -1
    return u @ vt


def typical_orientation_of(
    reference_mm: np.ndarray,
    shapes_mm: Sequence[np.ndarray],
    directions: Sequence[np.ndarray],
) -> np.ndarray | None:
    """The mean orthogonal map from ``reference_mm`` to the cases' array axes (mm): each case's
    affine fit to the reference (cases with fewer than ``2 (D + 1)`` common landmarks left out),
    times its array ``directions`` ``(D, D)``, made orthogonal; None when the cases' maps differ
    in handedness or none can be fitted."""
    turns = []
    for shape, direction in zip(shapes_mm, directions, strict=True):
        common = np.isfinite(shape).all(axis=1) & np.isfinite(reference_mm).all(axis=1)
        if common.sum() < 2 * (shape.shape[1] + 1):
            continue
        matrix = affine_fit(reference_mm[common], shape[common])
        if matrix is not None:
            turns.append(orthogonal_part(matrix[: shape.shape[1]] @ np.asarray(direction)))
    if not turns or len({bool(np.linalg.det(t) > 0) for t in turns}) != 1:
        return None
    return mean_orthogonal(turns)


def apply_affine(matrix: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Points ``(N, D)`` mapped by an affine ``(D + 1, D)`` matrix from :func:`affine_fit`."""
    return np.c_[points_mm, np.ones(len(points_mm))] @ matrix


def fit_shape_model(
    shapes_mm: Sequence[np.ndarray], directions: Sequence[np.ndarray] | None = None
) -> ShapeModel | None:
    """The shape model of training landmark sets ``(K, D)`` each (NaN rows missing), or None
    with fewer than :data:`MIN_CASES` usable cases or too few landmarks for an affine fit;
    the cases' array ``directions`` give it their typical orientation."""
    shapes = [np.asarray(s, dtype=np.float64) for s in shapes_mm]
    ndim = shapes[0].shape[1] if shapes else 0
    usable = [s for s in shapes if np.isfinite(s).all(axis=1).sum() >= 2 * (ndim + 1)]
    if len(usable) < MIN_CASES or shapes[0].shape[0] < 2 * (ndim + 1):
        return None
    first = max(usable, key=lambda s: np.isfinite(s).all(axis=1).sum())
    reference = first.copy()
    for _ in range(ALIGNMENT_ROUNDS):
        aligned = np.full((len(usable), *reference.shape), np.nan)
        for i, shape in enumerate(usable):
            common = np.isfinite(shape).all(axis=1) & np.isfinite(reference).all(axis=1)
            matrix = affine_fit(shape[common], reference[common])
            if matrix is not None:
                seen = np.isfinite(shape).all(axis=1)
                aligned[i, seen] = apply_affine(matrix, shape[seen])
        with np.errstate(invalid="ignore"):
            seen_count = np.isfinite(aligned).all(axis=2).sum(axis=0)
            mean = np.where(
                seen_count[:, None] > 0,
                np.nansum(aligned, axis=0) / np.maximum(seen_count, 1)[:, None],
                np.nan,
            )
        common = np.isfinite(mean).all(axis=1) & np.isfinite(first).all(axis=1)
        gauge = affine_fit(
            mean[common], first[common]
        )  # kept in the first case's frame: no drift or collapse
        reference = mean if gauge is None else apply_affine(gauge, mean)
    residuals, values, hands, angles = [], [], set(), []
    for shape in usable:
        common = np.isfinite(shape).all(axis=1) & np.isfinite(reference).all(axis=1)
        matrix = affine_fit(reference[common], shape[common])
        if matrix is None:
            continue
        residuals.append(
            np.linalg.norm(apply_affine(matrix, reference[common]) - shape[common], axis=1)
        )
        values.append(np.linalg.svd(matrix[:ndim], compute_uv=False))
        hands.add(handedness_of(matrix))
        angles.append(rotation_deg_of(matrix))
    if not residuals:
        return None
    rms = float(np.sqrt(np.mean(np.concatenate(residuals) ** 2)))
    values = np.concatenate(values)
    typical = None if directions is None else typical_orientation_of(reference, shapes, directions)
    return ShapeModel(
        reference,
        max(INLIER_RMS_FACTOR * rms, 1e-6),
        (float(values.min() / SINGULAR_VALUE_SLACK), float(values.max() * SINGULAR_VALUE_SLACK)),
        hands.pop() if len(hands) == 1 else 0,
        min(max(angles) + ROTATION_SLACK_DEG, 180.0),
        typical,
    )
