"""From a new image to landmarks in world millimetres, with a confidence and "not present".

A model folder is one training run (``run.json``), or a folder of runs: runs of the same
configuration are an ensemble (their heatmaps are averaged), and a coarse configuration with
its fine one is a cascade (coarse estimate on the whole image, then a fine patch around each
landmark). Ground truth is never read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medlandmark.console import warn
from medlandmark.device import select_device
from medlandmark.errors import MedlandmarkError
from medlandmark.heatmaps import (
    DEFAULT_PRESENCE_THRESHOLD,
    DecodedLandmarks,
    confidence_of,
    decode_heads,
    decode_heatmaps,
    relative_confidences,
)
from medlandmark.io.geometry import (
    Geometry,
    centred_geometry,
    cropped_geometry,
    index_to_world,
    left_right_axis,
    world_to_index,
)
from medlandmark.io.images import ImageData, read_image
from medlandmark.io.landmark_formats import CaseVerdict
from medlandmark.io.landmarks import LandmarkSet, pair_permutation, symmetric_pair_indices
from medlandmark.models import channels_last, load_run_network
from medlandmark.preprocessing import preprocess_image
from medlandmark.preprocessing.crops import crop_with_zeros, sample_on_geometry
from medlandmark.preprocessing.orientation import candidate_orientations
from medlandmark.records.plan import Configuration, Plan
from medlandmark.records.run import (
    ONNX_FILE,
    RUN_FILE,
    RunRecord,
    VerdictThresholds,
    read_run_record,
)
from medlandmark.shape_model import ExpectedFit, ShapeModel, cut_off_by
from medlandmark.sliding_window import head_strides, sliding_window_outputs
from medlandmark.verdict import CaseEvidence, combined_thresholds, evidence_of_fit, judge

Network = Callable[[torch.Tensor], Sequence[torch.Tensor]]
NetworkFactory = Callable[[RunRecord, Path], Network]


@dataclass
class Prediction:
    """Landmarks of one image: world mm (NaN where predicted missing; the position found is
    kept in ``landmarks.recorded_mm``), the confidence (``peak``: the heatmap's peak on the scale
    of the training targets, 0 = empty, 1 = a target's peak, clipped to 0-1), the spread, and
    the case's verdict (also in ``landmarks.verdict``) with the evidence it rests on."""

    landmarks: LandmarkSet
    peak: np.ndarray
    spread_mm: np.ndarray
    evidence: CaseEvidence | None = None
    orientation: str = "as given"  # the move that made the image look like the training images

    @property
    def verdict(self) -> CaseVerdict | None:
        return self.landmarks.verdict

    @property
    def present(self) -> np.ndarray:
        return self.landmarks.present


@dataclass
class FirstPass:
    """The first stage on one whole image: its full-resolution heatmaps ``(K, *spatial)`` on the
    preprocessed ``geometry``, the landmarks found (world mm), their confidences, spreads and
    presence by the presence rule, the shape model's fit to them and the case's evidence."""

    heatmaps: torch.Tensor
    geometry: Geometry
    points_mm: np.ndarray
    peak: np.ndarray
    spread_mm: np.ndarray
    present: np.ndarray
    fit: ExpectedFit | None
    evidence: CaseEvidence


@dataclass
class Stage:
    """One configuration: its networks (one per fold), its plan, and what was learnt with it."""

    configuration: Configuration
    plan: Plan
    networks: list[Network]
    presence_threshold: float
    pairs: list[tuple[int, int]]
    spacing_mm: list[float] | None
    shape_model: ShapeModel | None = None
    prediction: str = "full_resolution"  # the runs' rule: which outputs give the points
    target: str = "gaussian"  # the runs' training targets: what a peak means as a confidence
    error_bounds_mm: np.ndarray | None = None  # per landmark, the runs' validated error radius
    relative_presence_threshold: float | None = None  # the runs' threshold for relative peaks
    verdict_thresholds: VerdictThresholds | None = None  # the runs' validated case checks

    def heatmaps(
        self,
        array: np.ndarray,
        geometry: Geometry,
        device: torch.device,
        mirror: bool,
        batch_size: int = 1,
    ) -> torch.Tensor:
        """Mean heatmaps ``(N, K, *spatial)`` of the ensemble over a preprocessed image, one per
        output the prediction rule decodes ([0] the full-resolution one), averaged with the
        left-right mirrored prediction (pairs swapped back) when ``mirror``; ``batch_size``
        sliding windows go through a network at once."""
        image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)
        patch = self.configuration.patch_size
        total = None
        for network in self.networks:
            strides = self.strides(network)
            heads = sliding_window_outputs(network, image, patch, strides, batch_size=batch_size)
            if mirror:
                axis = left_right_axis(geometry) + 1
                flipped = sliding_window_outputs(
                    network, image.flip(axis), patch, strides, batch_size=batch_size
                ).flip(axis + 1)
                heads = 0.5 * (heads + swap_channels(flipped, self.pairs, dim=1))
            total = heads if total is None else total + heads
        return total / len(self.networks)

    def strides(self, network: Network) -> list[tuple[int, ...]]:
        """The strides of the outputs the prediction rule decodes, for one of the networks."""
        try:
            return head_strides(network, self.prediction, self.configuration.spatial_dims)
        except ValueError as error:
            raise MedlandmarkError(str(error)) from None

    def decode(self, heads: torch.Tensor) -> DecodedLandmarks:
        """The landmarks of ``heads`` (from :meth:`heatmaps`), by the prediction rule."""
        return decode_heads(heads, self.strides(self.networks[0]))

    def present(self, confidence: np.ndarray, rule: str) -> np.ndarray:
        """Which landmarks of one case are present by their confidences ``(K,)``: ``absolute``
        compares each with the presence threshold, ``relative`` compares its ratio to the case's
        reference level (:func:`relative_confidences`) with the relative threshold (the
        absolute rule when the runs have none); ``shape`` keeps every landmark above a fixed
        floor of that ratio (:data:`SHAPE_RULE_FLOOR`) and leaves "missing" to the shape
        check, whose field-of-view test no contrast moves."""
        if rule == "shape":
            return relative_confidences(confidence) >= SHAPE_RULE_FLOOR
        if rule == "relative" and self.relative_presence_threshold is not None:
            return relative_confidences(confidence) >= self.relative_presence_threshold
        return confidence >= self.presence_threshold

    def to(self, device: torch.device) -> None:
        """Move the (PyTorch) networks to ``device``."""
        self.networks = [
            n.to(device) if isinstance(n, torch.nn.Module) else n for n in self.networks
        ]


ORIENTATION_MODES = ("auto", "search", "fixed")
WINDOW_ORIENTATIONS = ("auto", "image", "anatomy")
PRESENCE_RULES = ("auto", "absolute", "relative", "shape")
SHAPE_RULE_FLOOR = 0.25  # of the case's reference level: far weaker than anything found


def presence_rule(presence: str, ndim: int) -> str:
    """The rule ``auto`` stands for: ``shape`` in 3D (on a shifted AFIDs validation set it had
    the best worse-of precision and recall of the three), ``absolute`` in 2D."""
    if presence != "auto":
        return presence
    return "shape" if ndim == 3 else "absolute"


def spread_in_mm(spread_per_axis_voxels: torch.Tensor, geometry: Geometry) -> np.ndarray:
    """Heatmap spread ``(K,)`` in mm: each axis's spread in voxels times that axis's spacing,
    averaged over the axes."""
    per_axis = spread_per_axis_voxels.float().cpu().numpy() * np.asarray(geometry.spacing_mm)
    return per_axis.mean(axis=-1)


def swap_channels(
    heatmaps: torch.Tensor, pairs: Sequence[tuple[int, int]], dim: int = 0
) -> torch.Tensor:
    """Exchange the channels (axis ``dim``) of each symmetric pair (what a mirroring does to
    their meaning)."""
    order = torch.as_tensor(pair_permutation(heatmaps.shape[dim], pairs), device=heatmaps.device)
    return heatmaps.index_select(dim, order)


class Predictor:
    """Predict landmarks with one stage, or a coarse-to-fine cascade of two.

    The attribute ``windows_per_batch``: sliding windows through a network at once (the plan's
    training batch size, which fits the device); out of memory halves it, then moves to the CPU.
    ``shape_check`` reports missing the landmarks that the training constellation, fitted to the
    landmarks found, places beyond the image's field of view (:mod:`medlandmark.shape_model`).
    ``orientation``: ``fixed`` trusts the image as given; ``search`` runs the first stage on
    every mirror and turn of the voxels (:func:`candidate_orientations`; in 3D the axis flips)
    and predicts on the one whose landmarks fit the training shape best; ``auto`` searches 2D
    images (radiographs: no header says which way the anatomy faces) and trusts 3D headers.
    ``presence``: how a landmark is judged present (:meth:`Stage.present`).
    ``window_orientation``: a cascade's fine windows run along the image's axes (``image``), or
    (``anatomy``) on a grid turned so that the anatomy the first stage's shape fit found lies
    as the training arrays typically held it (runs without a typical orientation, or a case
    without a plausible fit, keep the image's axes); ``auto`` turns them in 3D only.
    """

    def __init__(
        self,
        stages: list[Stage],
        names: list[str],
        device: torch.device,
        tta: bool = False,
        shape_check: bool = True,
        orientation: str = "auto",
        presence: str = "auto",
        window_orientation: str = "auto",
    ):
        self.stages, self.names, self.device, self.tta = stages, names, torch.device(device), tta
        self.shape_check = shape_check
        if orientation not in ORIENTATION_MODES:
            raise MedlandmarkError(
                f"orientation must be one of {', '.join(ORIENTATION_MODES)}, got '{orientation}'"
            )
        self.orientation = orientation
        if presence not in PRESENCE_RULES:
            raise MedlandmarkError(
                f"presence must be one of {', '.join(PRESENCE_RULES)}, got '{presence}'"
            )
        self.presence = presence
        if window_orientation not in WINDOW_ORIENTATIONS:
            raise MedlandmarkError(
                f"window orientation must be one of {', '.join(WINDOW_ORIENTATIONS)}, "
                f"got '{window_orientation}'"
            )
        self.window_orientation = window_orientation
        self.windows_per_batch = max(1, min(s.configuration.batch_size for s in stages))

    @classmethod
    def from_run(
        cls,
        model_dir: str | Path,
        device: str = "auto",
        weights: str = "best",
        tta: bool = False,
        network_factory: NetworkFactory | None = None,
        onnx: str | Path | None = None,
        **judgement,
    ) -> Predictor:
        """Load a run folder, or a folder of runs (ensembles per configuration, a cascade when a
        coarse configuration and its fine one are both present). ``onnx`` runs the networks
        with onnxruntime: a file for a single run, or ``"run"`` for each run's ``model.onnx``;
        ``judgement`` holds the keyword arguments ``shape_check``, ``orientation``,
        ``presence`` and ``window_orientation`` of the constructor."""
        if onnx is not None and network_factory is None:
            network_factory = _onnx_factory(onnx)
        device = select_device(device)
        records = _run_records(Path(model_dir))
        by_configuration: dict[str, list[tuple[Path, RunRecord]]] = {}
        for path, record in records:
            by_configuration.setdefault(record.configuration, []).append((path, record))
        names = records[0][1].landmarks
        if any(r.landmarks != names for _, r in records):
            raise MedlandmarkError("the runs were trained on different landmarks", model_dir)
        stages = [
            _stage(runs, device, weights, network_factory)
            for runs in _stage_order(by_configuration, Path(model_dir))
        ]
        return cls(stages, names, device, tta, **judgement)

    @classmethod
    def from_pretrained(cls, name: str, device: str = "auto", **options) -> Predictor:
        """A model shipped in the package (``medlandmark models list``), by name; ``options``
        are :meth:`from_run`'s."""
        from medlandmark.records.model_card import shipped_model

        return cls.from_run(shipped_model(name).runs, device, **options)

    def predict(
        self,
        image: str | Path | ImageData,
        spacing_xy_mm: Sequence[float] | None = None,
        name: str | None = None,
    ) -> Prediction:
        """Landmarks of one image (a path, or voxels with their geometry; ``name`` says which in
        warnings). Out of memory, it is retried with fewer windows per batch, then on the CPU."""
        name = name or (str(image) if not isinstance(image, ImageData) else "image")
        if not isinstance(image, ImageData):
            image = read_image(image, spacing_xy_mm=spacing_xy_mm or self.stages[0].spacing_mm)
        while True:
            try:
                return self._predict_oriented(image)
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                reason = str(error).strip().splitlines()[0][:200]
            self._use_less_memory(name, reason)  # outside the handler: the failed attempt is freed

    def _use_less_memory(self, name: str, reason: str) -> None:
        """After running out of memory: half as many windows per batch, then the CPU (for this
        and the following images); on the CPU with one window, an error for this image."""
        release_cached_memory(self.device)
        if self.windows_per_batch > 1:
            self.windows_per_batch //= 2
            warn(
                f"{name}: out of memory on {self.device}; retrying with {self.windows_per_batch} sliding window(s) per batch"
            )
        elif self.device.type != "cpu":
            warn(
                f"{name}: out of memory on {self.device} even with one sliding window per batch; falling back to the CPU (slower) from now on"
            )
            self.device = torch.device("cpu")
            for stage in self.stages:
                stage.to(self.device)
        else:
            raise MedlandmarkError(
                f"out of memory on the CPU even with one sliding window per batch ({reason})", name
            )

    def _predict_oriented(self, image: ImageData) -> Prediction:
        """:meth:`_predict` on the image as given, or on the candidate orientation whose first
        stage's landmarks fit the training shape best, mapped back to the image as given. The
        chosen candidate's first pass is reused (run again only to add the mirrored one)."""
        search = self.orientation == "search" or (self.orientation == "auto" and image.ndim == 2)
        mirror = self.tta and bool(self.stages[0].pairs)
        if not search or self.stages[0].shape_model is None:
            return self._predict(image, self._first_pass(image, mirror))
        best = None
        for candidate in candidate_orientations(image.geometry, turns=True):
            moved = candidate.image(image)
            first = self._first_pass(moved, mirror=False)
            score = self._orientation_score(first)
            if best is None or score > best[0]:  # ties: the first
                best = (score, candidate, moved, first)
        _, chosen, moved, first = best
        prediction = self._predict(moved, self._first_pass(moved, True) if mirror else first)
        if chosen.is_identity:
            return prediction
        landmarks = prediction.landmarks
        landmarks.points_mm = chosen.world_back(landmarks.points_mm, image.geometry)
        if landmarks.recorded_mm is not None:
            landmarks.recorded_mm = chosen.world_back(landmarks.recorded_mm, image.geometry)
        prediction.orientation = chosen.name
        return prediction

    def _orientation_score(self, first: FirstPass) -> tuple[float, ...]:
        """How well a first pass's landmarks fit the training shape: a plausible fit, neither
        mirrored nor turned beyond the training cases, first; then the landmarks that agree with
        it times their mean confidence."""
        evidence = first.evidence
        agreeing = evidence.present_count - len(evidence.disagreeing) if evidence.fitted else 0
        plausible = evidence.fitted and not (evidence.mirrored or evidence.turned)
        return (float(plausible), agreeing * float(np.nan_to_num(evidence.mean_confidence)))

    def _first_pass(self, image: ImageData, mirror: bool) -> FirstPass:
        """The first stage on the whole image (with the mirrored pass when ``mirror``): the
        landmarks, their presence by the presence rule, the shape fit and the case's evidence."""
        first = self.stages[0]
        array, geometry = preprocess_image(image, first.plan, first.configuration)
        heads = first.heatmaps(array, geometry, self.device, mirror, self.windows_per_batch)
        decoded = first.decode(heads)
        points = index_to_world(decoded.points[0].double().cpu().numpy(), geometry)
        peak = confidence_of(decoded.peak[0].float().cpu(), first.target)
        present = first.present(peak, presence_rule(self.presence, image.ndim))
        shape_model = first.shape_model
        fit = None if shape_model is None else shape_model.expected(points, present)
        return FirstPass(
            heatmaps=heads[0],
            geometry=geometry,
            points_mm=points,
            peak=peak,
            spread_mm=spread_in_mm(decoded.spread_per_axis[0], geometry),
            present=present,
            fit=fit,
            evidence=evidence_of_fit(peak, present, points, shape_model, fit, image.geometry),
        )

    def _predict(self, image: ImageData, first: FirstPass) -> Prediction:
        """The landmarks of ``image`` from its first pass: refined by the fine stage of a
        cascade, checked against the shape model, and reported missing outside the image."""
        shape_model = self.stages[0].shape_model
        points, spread_mm = first.points_mm.copy(), first.spread_mm.copy()
        peak, present, fit = first.peak.copy(), first.present.copy(), first.fit
        cascade = len(self.stages) > 1
        if cascade:
            points, spread_mm = self._refine(image, points, present, spread_mm, fit)
        if self.shape_check and shape_model is not None:
            if cascade:  # the refined points get their own fit
                fit = shape_model.expected(points, present)
            present &= ~self._missing_by_shape(fit, peak, image.geometry)
            self._follow_the_shape(image, first, fit, points, peak, spread_mm, present)
        present &= ~(image.geometry.depth_inside_mm(points) < 0)  # not in this image
        kept = points.copy()
        points[~present] = np.nan
        landmarks = LandmarkSet(
            self.names,
            points,
            recorded_mm=np.where(present[:, None], np.nan, kept),
            confidence=peak,
            error_bound_mm=self._error_bounds(present),
            verdict=judge(first.evidence, self.stages[0].verdict_thresholds, self.names),
        )
        return Prediction(landmarks, peak, spread_mm, first.evidence)

    def _missing_by_shape(
        self, fit: ExpectedFit | None, peak: np.ndarray, geometry: Geometry
    ) -> np.ndarray:
        """``(K,)`` True for landmarks the shape check reports missing: those ``fit`` expects
        beyond the field of view. Under the ``shape`` presence rule a case without a plausible
        fit has no such evidence, so there its peaks decide as the ``absolute`` rule does."""
        first = self.stages[0]
        if presence_rule(
            self.presence, geometry.ndim
        ) == "shape" and not first.shape_model.plausible(fit):
            return ~first.present(peak, "absolute")
        return cut_off_by(fit, geometry, len(peak))

    def _error_bounds(self, present: np.ndarray) -> np.ndarray | None:
        """Each present point's error bound (mm): the last stage's that validated (a cascade
        whose fine stage did not keeps its coarse stage's, larger ones); NaN for the missing."""
        bounds = next(
            (s.error_bounds_mm for s in reversed(self.stages) if s.error_bounds_mm is not None),
            None,
        )
        return None if bounds is None else np.where(present, bounds, np.nan)

    def _follow_the_shape(
        self,
        image: ImageData,
        first: FirstPass,
        fit: ExpectedFit | None,
        points_mm: np.ndarray,
        peak: np.ndarray,
        spread_mm: np.ndarray,
        present: np.ndarray,
    ) -> None:
        """In place: each present landmark found far from where ``fit`` places it (a peak on a
        look-alike, e.g. the other side's twin) takes its heatmap's peak near that place instead:
        the fine stage's, in a patch centred there, or the first pass's heatmaps. Nothing moves
        when the fit is not plausible (mirrored, or turned beyond the training cases)."""
        shape_model = self.stages[0].shape_model
        if not shape_model.plausible(fit):  # a mirrored or over-turned fit is no guide
            return
        outliers = shape_outliers(shape_model, fit, points_mm, present, image.geometry)
        if not len(outliers):
            return
        if len(self.stages) > 1:
            chosen = np.isin(np.arange(len(points_mm)), outliers)
            again, again_spread = self._refine(
                image, fit.expected_mm, chosen, spread_mm, fit, guided=shape_model
            )
            points_mm[outliers], spread_mm[outliers] = again[outliers], again_spread[outliers]
            return
        radius_mm = guided_radius_mm(shape_model, first.geometry)
        target = self.stages[0].target
        for k in outliers:
            points_mm[k], found, spread_mm[k] = decode_near(
                first.heatmaps[k], first.geometry, fit.expected_mm[k], radius_mm
            )
            peak[k] = confidence_of(np.float64(found), target)

    def _refine(
        self,
        image: ImageData,
        points_mm: np.ndarray,
        present: np.ndarray,
        spread_mm: np.ndarray,
        fit: ExpectedFit | None,
        guided: ShapeModel | None = None,
    ):
        """The cascade's fine stage: a patch of the fine configuration centred on each coarse
        estimate, at full resolution, turned by :attr:`window_orientation` and ``fit`` (the
        first stage's shape fit); the landmark's own channel refines its position (when
        ``guided``, its peak near the patch centre, within :func:`guided_radius_mm`)."""
        fine = self.stages[1]
        array, geometry = preprocess_image(image, fine.plan, fine.configuration)
        patch = np.asarray(fine.configuration.patch_size)
        refined, refined_spread = points_mm.copy(), spread_mm.copy()
        radius_mm = None if guided is None else guided_radius_mm(guided, geometry)
        direction = None
        turn = self.window_orientation == "anatomy" or (
            self.window_orientation == "auto" and image.ndim == 3
        )
        if turn and self.stages[0].shape_model is not None:
            direction = self.stages[0].shape_model.window_direction(fit)
        mirror = self.tta and bool(fine.pairs)
        for k in np.flatnonzero(present):
            window, window_geometry = fine_window(array, geometry, points_mm[k], patch, direction)
            heads = fine.heatmaps(
                window, window_geometry, self.device, mirror, self.windows_per_batch
            )
            heatmaps = heads[0]
            if radius_mm is not None:
                refined[k], _, refined_spread[k] = decode_near(
                    heatmaps[k], window_geometry, points_mm[k], radius_mm
                )
                continue
            decoded = fine.decode(heads[:, k : k + 1])
            refined[k] = index_to_world(
                decoded.points[0, 0].double().cpu().numpy(), window_geometry
            )
            refined_spread[k] = spread_in_mm(decoded.spread_per_axis[0], window_geometry)[0]
        return refined, refined_spread


def fine_window(
    array: np.ndarray,
    geometry: Geometry,
    centre_mm: np.ndarray,
    patch: np.ndarray,
    direction: np.ndarray | None = None,
) -> tuple[np.ndarray, Geometry]:
    """A ``patch``-sized window of a preprocessed ``array`` centred on ``centre_mm`` and its
    geometry: cut along the array's axes (whole voxels), or with ``direction`` (columns: world
    axes of the window's array axes) sampled on a grid turned to it, trilinearly."""
    if direction is None:
        start = np.round(world_to_index(centre_mm, geometry) - (patch - 1) / 2).astype(int)
        window_geometry = cropped_geometry(
            geometry, [int(v) for v in start], [int(v) for v in patch]
        )
        return crop_with_zeros(array, start, patch), window_geometry
    window_geometry = centred_geometry(centre_mm, direction, geometry.spacing_mm, patch)
    return sample_on_geometry(array, geometry, window_geometry), window_geometry


def shape_outliers(
    shape_model: ShapeModel,
    fit: ExpectedFit | None,
    points_mm: np.ndarray,
    present: np.ndarray,
    geometry: Geometry,
) -> np.ndarray:
    """Indices of the present landmarks found farther than the shape model's inlier distance
    from where ``fit`` places them, that place being inside ``geometry`` (none without a fit)."""
    if fit is None:
        return np.zeros(0, dtype=int)
    distance = np.linalg.norm(points_mm - fit.expected_mm, axis=1)
    inside = geometry.contains_world(fit.expected_mm)
    return np.flatnonzero(present & inside & (distance > shape_model.inlier_mm))


def decode_near(
    heatmap: torch.Tensor, geometry: Geometry, centre_mm: np.ndarray, radius_mm: float
) -> tuple[np.ndarray, float, float]:
    """The peak of one heatmap ``(*spatial)`` within ``radius_mm`` of ``centre_mm``: its world
    position, height and spread in mm."""
    spacing = torch.tensor(geometry.spacing_mm, dtype=torch.float32, device=heatmap.device)
    grid = torch.stack(
        torch.meshgrid(
            *[torch.arange(n, device=heatmap.device) for n in geometry.shape], indexing="ij"
        ),
        dim=-1,
    )
    centre = torch.tensor(
        world_to_index(centre_mm, geometry), dtype=torch.float32, device=heatmap.device
    )
    near = (((grid - centre) * spacing).norm(dim=-1) <= radius_mm).to(heatmap.dtype)
    decoded = decode_heatmaps((heatmap * near)[None, None])
    point = index_to_world(decoded.points[0, 0].double().cpu().numpy(), geometry)
    return (
        point,
        float(decoded.peak[0, 0]),
        float(spread_in_mm(decoded.spread_per_axis[0], geometry)[0]),
    )


def guided_radius_mm(shape_model: ShapeModel, geometry: Geometry) -> float:
    """How far from its expected position a re-decoded landmark may lie: the inlier distance,
    and at least two voxels."""
    return max(shape_model.inlier_mm, 2.0 * max(geometry.spacing_mm))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device (or CPU) allocation failure, also as older backends say it."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError)
        and ("out of memory" in text or "can't allocate memory" in text)
    )


def release_cached_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back, so that a retry can use them."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _onnx_factory(onnx: str | Path) -> NetworkFactory:
    from medlandmark.inference.export import OnnxNetwork

    def factory(record: RunRecord, folder: Path) -> Network:
        return OnnxNetwork(folder / ONNX_FILE if str(onnx) == "run" else Path(onnx))

    return factory


def _run_records(model_dir: Path) -> list[tuple[Path, RunRecord]]:
    if (model_dir / RUN_FILE).is_file():
        folders = [model_dir]
    else:
        folders = sorted(p.parent for p in model_dir.glob(f"*/{RUN_FILE}"))
    if not folders:
        raise MedlandmarkError(
            "no trained run here (no run.json, nor sub-folders with one)", model_dir
        )
    return [(folder, read_run_record(folder)) for folder in folders]


def _stage_order(by_configuration: dict[str, list], model_dir: Path) -> list[list]:
    """One stage, or the coarse stage followed by its fine stage."""
    configurations = {
        name: runs[0][1].plan.configurations[name] for name, runs in by_configuration.items()
    }
    if len(configurations) == 1:
        return list(by_configuration.values())
    coarse = [n for n, c in configurations.items() if c.stage == "coarse"]
    if len(coarse) == 1 and len(configurations) == 2:
        following = configurations[coarse[0]].next_stage
        if following in configurations:
            return [by_configuration[coarse[0]], by_configuration[following]]
    raise MedlandmarkError(
        f"cannot combine the configurations {sorted(configurations)}: give one configuration, "
        "or a coarse one and its fine one",
        model_dir,
    )


def _stage(
    runs: list[tuple[Path, RunRecord]],
    device: torch.device,
    weights: str,
    network_factory: NetworkFactory | None,
) -> Stage:
    """The networks of one configuration's runs (an ensemble) and what their runs learnt."""
    networks, thresholds, bounds, checks, relative = [], [], [], [], []
    for folder, record in runs:
        if network_factory is not None:
            network = network_factory(record, folder)
        else:
            network = load_run_network(folder, record, weights, device)
            network = channels_last(network, record.plan.spatial_dims)
        networks.append(network)
        threshold = record.presence_threshold
        thresholds.append(DEFAULT_PRESENCE_THRESHOLD if threshold is None else threshold)
        if record.error_bounds_mm is not None:
            bounds.append(record.error_bounds_mm)
        if record.verdict_thresholds is not None:
            checks.append(record.verdict_thresholds)
        if record.relative_presence_threshold is not None:
            relative.append(record.relative_presence_threshold)
    _, record = runs[0]
    settings = record.settings
    pairs = symmetric_pair_indices(record.landmarks, record.symmetric_pairs)
    shape = record.shape_model
    return Stage(
        configuration=record.plan_configuration,
        plan=record.plan,
        networks=networks,
        presence_threshold=float(np.mean(thresholds)),
        pairs=pairs,
        spacing_mm=record.spacing_mm,
        shape_model=None if shape is None else ShapeModel.from_dict(shape.model_dump()),
        prediction="full_resolution" if settings is None else settings.prediction,
        target="gaussian" if settings is None else settings.target,
        error_bounds_mm=np.max(bounds, axis=0) if bounds else None,  # an ensemble: the widest
        verdict_thresholds=combined_thresholds(checks),
        relative_presence_threshold=float(np.mean(relative)) if relative else None,
    )
