"""A 3D training set from one template and its AFIDs: ``medlandmark convert afids-synth``.

Each case sees the template through a random but exactly known warp from the case's world to the
template's, ``template_mm = elastic(affine(case_mm))``: a random affine (rotation, per-axis
scaling, shear, translation) and a smooth random displacement field. The image is resampled
through that warp (SimpleITK, linear) onto a new grid (spacing, orientation and field of view of
its own), then given another contrast (gamma), a smooth multiplicative bias field and Rician
noise. The landmarks go the other way, through the exact inverse: the affine's in closed form,
the elastic field's by fixed-point iteration to 1e-6 mm. A landmark outside the new grid (a
field-of-view crop) is written as missing.

Splits: with 60 cases or more, ``test`` holds cases 40-59 and ``train`` every other case (the test
set is the same for any ``--cases`` >= 60 and a given seed); with fewer, ``test`` holds the last
third (rounded) and ``train`` the rest. Case ``k`` depends only on the seed and ``k``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medlandmark import console
from medlandmark.datasets.converters import (
    AFIDS_LANDMARKS,
    AFIDS_SYMMETRIC_PAIRS,
    check_output_dataset,
    read_afids_landmarks,
    refuse_other_files_of_case,
    warn_landmarks_outside,
)
from medlandmark.datasets.dataset import DATASET_FILE, DatasetSpec, discover_cases, write_spec
from medlandmark.errors import DatasetError, ImageError
from medlandmark.io.geometry import (
    Geometry,
    cropped_geometry,
    index_to_world,
    resampled_geometry,
    world_to_index,
)
from medlandmark.io.images import read_image, write_image
from medlandmark.io.landmarks import LandmarkSet, write_landmarks

# Output spacings (array order: the first is the slowest axis), drawn uniformly.
OUTPUT_SPACINGS_MM = (
    (1.0, 1.0, 1.0),
    (1.2, 1.2, 1.2),
    (1.5, 1.5, 1.5),
    (3.0, 1.0, 1.0),
    (1.0, 1.0, 3.0),
    (1.0, 3.0, 1.0),
)
TRAIN_CASES, TEST_CASES = 40, 20
FOREGROUND_FRACTION = 0.05  # of the template's 99.5th percentile
FIELD_SPACING_MM = 6.0  # the elastic field's grid (linear between its points)
FIELD_PADDING_MM = 40.0  # around the template box; the field fades to 0 across it
MAX_ELASTIC_GRADIENT = 0.5  # keeps the field invertible and its fixed-point inverse contracting
INVERSE_TOLERANCE_MM = 1e-6
INVERSE_MAX_ITERATIONS = 200
INT16_MAX = 32767


@dataclass(frozen=True)
class SynthOptions:
    """Ranges of the random draws (angles in degrees, lengths in mm)."""

    max_rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_translation_mm: float = 5.0
    max_shear: float = 0.05
    elastic_rms_mm: float = 2.0
    elastic_control_spacing_mm: float = 40.0
    spacings_mm: tuple[tuple[float, float, float], ...] = OUTPUT_SPACINGS_MM
    spacing_scale: float = 1.0  # > 1 gives coarser, faster cases (tests)
    oblique_probability: float = 0.5
    max_oblique_deg: float = 20.0
    crop_probability: float = 0.3
    crop_quantiles: tuple[float, float] = (0.25, 0.75)  # where the cut falls among the landmarks
    max_voxels: int = 160**3
    margin_mm: float = 10.0
    gamma_range: tuple[float, float] = (0.7, 1.5)
    max_log_bias: float = 0.3
    noise_range: tuple[float, float] = (0.01, 0.04)  # Rician sigma / the template's bright level
    bright_level_range: tuple[float, float] = (800.0, 3000.0)  # output value of that level
    improper_probability: float = 0.0  # grids stored with one axis reversed (a det -1 direction)


STRONGER_SPACINGS_MM = (
    (1.0, 1.0, 1.0),
    (2.0, 1.0, 1.0),
    (1.0, 2.0, 1.0),
    (1.0, 1.0, 2.0),
    (1.0, 3.0, 1.0),
    (3.0, 1.0, 1.0),
    (1.5, 3.0, 1.5),
    (2.0, 2.0, 2.0),
)
VARIATIONS = {
    # what training sees (the benchmarks' datasets)
    "default": SynthOptions(),
    # a shifted test set: wider spacings, larger turns, grids stored mirrored, stronger contrast
    # changes, bias and noise than the default draws
    "strong": SynthOptions(
        max_rotation_deg=25.0,
        scale_range=(0.85, 1.15),
        max_translation_mm=10.0,
        spacings_mm=STRONGER_SPACINGS_MM,
        oblique_probability=0.7,
        max_oblique_deg=30.0,
        crop_probability=0.4,
        gamma_range=(0.5, 2.0),
        max_log_bias=0.5,
        noise_range=(0.02, 0.08),
        bright_level_range=(300.0, 6000.0),
        improper_probability=0.5,
    ),
}


@dataclass(frozen=True)
class Crop:
    """Cut the grid along array ``axis`` at a quantile of the landmarks, keeping one side."""

    axis: int
    keep_low: bool
    quantile: float


@dataclass(frozen=True, eq=False)
class CaseDraw:
    """Everything random about one case."""

    rotation_deg: np.ndarray
    scales: np.ndarray
    shear: np.ndarray
    translation_mm: np.ndarray
    elastic_seed: int
    spacing_mm: tuple[float, float, float]
    direction: np.ndarray  # columns: world (LPS) unit vectors of the array axes
    crop: Crop | None
    gamma: float
    bias_coefficients: np.ndarray
    noise_fraction: float
    bright_level: float
    noise_seed: int


@dataclass(frozen=True, eq=False)
class Template:
    """The source of every case: voxels (SimpleITK, float32), geometry and landmarks."""

    image: sitk.Image
    geometry: Geometry
    landmarks: LandmarkSet
    foreground_corners_mm: np.ndarray  # (8, 3): the box of voxels above FOREGROUND_FRACTION
    bright_level: float  # 99.5th percentile of the voxels

    @property
    def centre_mm(self) -> np.ndarray:
        return self.foreground_corners_mm.mean(axis=0)


@dataclass(eq=False)
class Warp:
    """``template_mm = elastic(affine(case_mm))``, with its exact inverse for points."""

    affine: sitk.AffineTransform
    elastic: sitk.DisplacementFieldTransform

    def transform(self) -> sitk.Transform:
        """Case world -> template world, as ``sitk.Resample`` needs it."""
        return sitk.CompositeTransform([self.elastic, self.affine])  # the last is applied first

    def to_template(self, points_mm: np.ndarray) -> np.ndarray:
        """Template world mm of case world mm points (NaN rows stay NaN)."""
        transform = self.transform()
        return _map_points(points_mm, lambda p: np.asarray(transform.TransformPoint(p)))

    def to_case(self, points_mm: np.ndarray) -> np.ndarray:
        """Case world mm of template world mm points: the exact inverse of :meth:`to_template`."""
        inverse_affine = self.affine.GetInverse()
        return _map_points(
            points_mm, lambda p: np.asarray(inverse_affine.TransformPoint(self._elastic_inverse(p)))
        )

    def _elastic_inverse(self, target_mm: np.ndarray) -> tuple[float, ...]:
        """``w`` with ``elastic(w) = target``: ``w <- w - (elastic(w) - target)`` contracts,
        the field's gradient being below :data:`MAX_ELASTIC_GRADIENT`."""
        point = target_mm.copy()
        for _ in range(INVERSE_MAX_ITERATIONS):
            residual = np.asarray(self.elastic.TransformPoint(tuple(point))) - target_mm
            if np.linalg.norm(residual) < INVERSE_TOLERANCE_MM:
                return tuple(point)
            point -= residual
        raise DatasetError(f"elastic warp could not be inverted at {target_mm.tolist()} mm")


@dataclass(frozen=True, eq=False)
class SynthCase:
    """One generated case: int16 voxels, their geometry, the landmarks and the warp used."""

    array: np.ndarray
    geometry: Geometry
    landmarks: LandmarkSet
    warp: Warp
    draw: CaseDraw = field(repr=False)


def convert_afids_synth(
    template: Path,
    fcsv: Path,
    out: Path,
    cases: int = 60,
    seed: int = 0,
    options: SynthOptions | None = None,
    variation: str = "default",
) -> Path:
    """Write ``cases`` randomly warped copies of ``template`` with its AFIDs to dataset ``out``;
    ``variation`` names the ranges of the draws (:data:`VARIATIONS`) unless ``options`` are
    given."""
    template, fcsv, out = Path(template), Path(fcsv), Path(out)
    if cases < 1:
        raise DatasetError(f"the number of cases must be at least 1, got {cases}")
    if seed < 0:
        raise DatasetError(f"the seed must be 0 or more, got {seed}")
    if variation not in VARIATIONS:
        raise DatasetError(f"unknown variation '{variation}' (use {', '.join(VARIATIONS)})")
    options = options or VARIATIONS[variation]
    source = load_template(template, fcsv)
    check_output_dataset(out, AFIDS_LANDMARKS)
    ids = synth_case_ids(cases)
    for case_id in ids:
        refuse_other_files_of_case(out, case_id)
    (out / DATASET_FILE).unlink(missing_ok=True)  # a folder without it shows an unfinished run
    for index, case_id in enumerate(console.progress(ids, description=f"warping {template.name}")):
        write_synth_case(source, out, case_id, case_rng(seed, index), options)
    stale = sorted({c.case_id for c in discover_cases(out)[0]} - set(ids))
    if stale:
        console.warn(f"{out} also holds cases this run did not write: {', '.join(stale[:10])}")
    write_spec(out, synth_spec(template, ids, seed, variation))
    console.info(f"wrote {cases} warped AFIDs cases to {out} (seed {seed})")
    return out


def write_synth_case(
    template: Template, out: Path, case_id: str, rng: np.random.Generator, options: SynthOptions
) -> None:
    """One warped case (image and landmarks) into dataset folder ``out``."""
    case = synth_case(template, draw_case(rng, options), options)
    write_image(out / "images" / f"{case_id}.nii.gz", case.array, case.geometry)
    write_landmarks(out / "landmarks" / f"{case_id}.mrk.json", case.landmarks, space="LPS")


def synth_case_ids(cases: int) -> list[str]:
    width = max(3, len(str(cases - 1)))
    return [f"synth{index:0{width}d}" for index in range(cases)]


def synth_splits(case_ids: list[str]) -> dict[str, list[str]]:
    """60 cases or more: test = cases 40-59, train = the others; fewer: the last third is test."""
    n = len(case_ids)
    if n >= TRAIN_CASES + TEST_CASES:
        test = case_ids[TRAIN_CASES : TRAIN_CASES + TEST_CASES]
        train = case_ids[:TRAIN_CASES] + case_ids[TRAIN_CASES + TEST_CASES :]
    else:
        n_test = round(n / 3)
        train, test = case_ids[: n - n_test], case_ids[n - n_test :]
    return {"train": train, "test": test} if test else {"train": train}


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of case ``index``: independent of how many cases are made."""
    return np.random.default_rng([seed, index])


def load_template(image: Path, fcsv: Path) -> Template:
    """The template image and its 32 AFIDs (Slicer .fcsv or .mrk.json)."""
    data = read_image(image)
    if data.geometry.ndim != 3 or data.channels != 1:
        raise ImageError(
            f"the template must be a 3D single-channel image, got {data.geometry.ndim}D with "
            f"{data.channels} channels",
            image,
        )
    landmarks = read_afids_landmarks(Path(fcsv))
    warn_landmarks_outside(landmarks, data.geometry, Path(fcsv))
    return make_template(data.array[0], data.geometry, landmarks)


def make_template(array: np.ndarray, geometry: Geometry, landmarks: LandmarkSet) -> Template:
    """A :class:`Template` from voxels in array order, their geometry and landmarks (world mm)."""
    array = np.asarray(array, dtype=np.float32)
    bright_level = float(np.percentile(array, 99.5))
    if not bright_level > 0:
        raise ImageError("the template has no bright voxels (99.5th percentile <= 0)")
    foreground = array > FOREGROUND_FRACTION * bright_level
    bounds = []
    for axis in range(3):
        along = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds.append((along[0] - 0.5, along[-1] + 0.5))
    corners = index_to_world(np.array(list(itertools.product(*bounds))), geometry)
    return Template(_sitk_image(array, geometry), geometry, landmarks, corners, bright_level)


def draw_case(rng: np.random.Generator, options: SynthOptions) -> CaseDraw:
    """All random choices of one case, from its own random stream."""
    direction = _signed_permutation(rng)
    oblique_deg = rng.uniform(-options.max_oblique_deg, options.max_oblique_deg, 3)
    if rng.random() < options.oblique_probability:
        direction = _rotation(oblique_deg) @ direction
    crop = Crop(
        int(rng.integers(3)), bool(rng.random() < 0.5), float(rng.uniform(*options.crop_quantiles))
    )
    spacing = options.spacings_mm[int(rng.integers(len(options.spacings_mm)))]
    if options.improper_probability > 0 and rng.random() < options.improper_probability:
        direction = direction @ np.diag([1.0, 1.0, -1.0])  # last array axis stored reversed
    return CaseDraw(
        rotation_deg=rng.uniform(-options.max_rotation_deg, options.max_rotation_deg, 3),
        scales=rng.uniform(*options.scale_range, 3),
        shear=rng.uniform(-options.max_shear, options.max_shear, 3),
        translation_mm=rng.uniform(-options.max_translation_mm, options.max_translation_mm, 3),
        elastic_seed=int(rng.integers(2**31)),
        spacing_mm=tuple(float(s) * options.spacing_scale for s in spacing),
        direction=direction,
        crop=crop if rng.random() < options.crop_probability else None,
        gamma=float(rng.uniform(*options.gamma_range)),
        bias_coefficients=rng.uniform(-1.0, 1.0, 9),
        noise_fraction=float(rng.uniform(*options.noise_range)),
        bright_level=float(rng.uniform(*options.bright_level_range)),
        noise_seed=int(rng.integers(2**31)),
    )


def synth_case(template: Template, draw: CaseDraw, options: SynthOptions) -> SynthCase:
    """The warped, resampled and re-contrasted template, and its landmarks mapped exactly."""
    warp = make_warp(template, draw, options)
    points_mm = warp.to_case(template.landmarks.points_mm)
    geometry = case_geometry(template, warp, points_mm, draw, options)
    points_mm[~geometry.contains_world(points_mm)] = np.nan
    array = warped_voxels(template, warp, geometry)
    array = intensity_changed(array, template.bright_level, draw, options)
    landmarks = LandmarkSet(template.landmarks.names, points_mm)
    return SynthCase(array, geometry, landmarks, warp, draw)


def make_warp(template: Template, draw: CaseDraw, options: SynthOptions) -> Warp:
    """The case's warp: affine about the template's foreground centre, then the elastic field."""
    shear = np.eye(3)
    shear[0, 1], shear[0, 2], shear[1, 2] = draw.shear
    matrix = _rotation(draw.rotation_deg) @ np.diag(draw.scales) @ shear
    affine = sitk.AffineTransform(
        matrix.ravel().tolist(), draw.translation_mm.tolist(), template.centre_mm.tolist()
    )
    elastic = elastic_field(
        template.geometry,
        options.elastic_rms_mm,
        options.elastic_control_spacing_mm,
        np.random.default_rng(draw.elastic_seed),
    )
    return Warp(affine, elastic)


def elastic_field(
    geometry: Geometry, rms_mm: float, control_spacing_mm: float, rng: np.random.Generator
) -> sitk.DisplacementFieldTransform:
    """A smooth random displacement field over the template box (plus a margin where it fades
    to 0), sampled every :data:`FIELD_SPACING_MM` from a cubic B-spline of random coefficients,
    scaled to ``rms_mm`` inside the box and its gradient kept below :data:`MAX_ELASTIC_GRADIENT`."""
    padding = [math.ceil(FIELD_PADDING_MM / s) for s in geometry.spacing_mm]
    padded_shape = [n + 2 * p for n, p in zip(geometry.shape, padding, strict=True)]
    padded = cropped_geometry(geometry, [-p for p in padding], padded_shape)
    grid = resampled_geometry(
        padded, [math.ceil(e / FIELD_SPACING_MM) + 1 for e in padded.extent_mm]
    )
    reference = _sitk_image(np.zeros(grid.shape, np.uint8), grid)
    mesh = [max(1, round(e / control_spacing_mm)) for e in padded.extent_mm[::-1]]
    bspline = sitk.BSplineTransformInitializer(reference, mesh, 3)
    bspline.SetParameters(rng.standard_normal(bspline.GetNumberOfParameters()).tolist())
    spacing, origin, direction = grid.to_itk()
    sampled = sitk.TransformToDisplacementField(
        bspline, sitk.sitkVectorFloat64, grid.shape[::-1], origin, spacing, direction
    )
    fade = _fade(grid)
    displacement_mm = sitk.GetArrayFromImage(sampled) * fade[..., None]
    inner = displacement_mm[fade == 1.0]
    displacement_mm *= rms_mm / max(float(np.sqrt(np.mean(np.sum(inner**2, axis=-1)))), 1e-12)
    gradient = _gradient_bound(displacement_mm, grid.spacing_mm)
    if gradient > MAX_ELASTIC_GRADIENT:
        displacement_mm *= MAX_ELASTIC_GRADIENT / gradient
    field_image = sitk.GetImageFromArray(displacement_mm, isVector=True)
    field_image.SetSpacing(spacing)
    field_image.SetOrigin(origin)
    field_image.SetDirection(direction)
    return sitk.DisplacementFieldTransform(field_image)


def case_geometry(
    template: Template, warp: Warp, points_mm: np.ndarray, draw: CaseDraw, options: SynthOptions
) -> Geometry:
    """The case's grid: the warped foreground box (plus a margin) along the drawn axes, cut to
    ``max_voxels`` around the landmarks, and cut through them where the draw says so."""
    unit = Geometry(draw.spacing_mm, (0.0, 0.0, 0.0), draw.direction, (1, 1, 1))
    inverse_affine = warp.affine.GetInverse()
    corners_mm = np.array(
        [inverse_affine.TransformPoint(c) for c in template.foreground_corners_mm.tolist()]
    )
    corners = world_to_index(corners_mm, unit)
    margin = (options.margin_mm + 2 * options.elastic_rms_mm) / np.asarray(draw.spacing_mm)
    start = np.floor(corners.min(axis=0) - margin).astype(int)
    stop = np.ceil(corners.max(axis=0) + margin).astype(int) + 1
    present = ~np.isnan(points_mm).any(axis=1)
    landmarks = world_to_index(points_mm[present], unit)
    centre = (
        (landmarks.min(axis=0) + landmarks.max(axis=0)) / 2 if present.any() else (start + stop) / 2
    )
    start, stop = _within_budget(start, stop, centre, options.max_voxels)
    if draw.crop is not None and present.any():
        start, stop = _cut(start, stop, landmarks, draw.crop)
    return cropped_geometry(unit, start.tolist(), (stop - start).tolist())


def warped_voxels(template: Template, warp: Warp, geometry: Geometry) -> np.ndarray:
    """The template resampled (linear, 0 outside) on ``geometry`` through the warp, float32."""
    spacing, origin, direction = geometry.to_itk()
    image = sitk.Resample(
        template.image,
        geometry.shape[::-1],
        warp.transform(),
        sitk.sitkLinear,
        origin,
        spacing,
        direction,
        0.0,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(image)


def intensity_changed(
    array: np.ndarray, template_bright_level: float, draw: CaseDraw, options: SynthOptions
) -> np.ndarray:
    """Gamma, a smooth multiplicative bias field and Rician noise; int16 voxels."""
    values = np.clip(array / np.float32(template_bright_level), 0.0, None) ** np.float32(draw.gamma)
    values *= bias_field(array.shape, draw.bias_coefficients, options.max_log_bias)
    rng = np.random.default_rng(draw.noise_seed)
    noise = rng.standard_normal((2, *array.shape), dtype=np.float32) * np.float32(
        draw.noise_fraction
    )
    values = np.sqrt((values + noise[0]) ** 2 + noise[1] ** 2)
    return np.clip(np.rint(values * np.float32(draw.bright_level)), 0, INT16_MAX).astype(np.int16)


def bias_field(shape: tuple[int, ...], coefficients: np.ndarray, max_log_bias: float) -> np.ndarray:
    """``exp`` of a quadratic polynomial of the grid position (each axis spans -1..1), float32,
    the polynomial's coefficients scaled so that it stays within +-``max_log_bias``."""
    u = [
        np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape(
            [n if a == axis else 1 for a in range(3)]
        )
        for axis, n in enumerate(shape)
    ]
    terms = [
        u[0],
        u[1],
        u[2],
        u[0] ** 2,
        u[1] ** 2,
        u[2] ** 2,
        u[0] * u[1],
        u[0] * u[2],
        u[1] * u[2],
    ]
    scale = max_log_bias / max(float(np.sum(np.abs(coefficients))), 1e-12)
    log_bias = sum(np.float32(c * scale) * t for c, t in zip(coefficients, terms, strict=True))
    return np.exp(np.broadcast_to(log_bias, shape)).astype(np.float32)


def synth_spec(template: Path, case_ids: list[str], seed: int, variation: str) -> DatasetSpec:
    """The dataset.json of afids-synth cases ``case_ids`` (splits as :func:`synth_splits`)."""
    return DatasetSpec(
        name="afids_synth",
        spatial_dims=3,
        landmarks=AFIDS_LANDMARKS,
        modalities=["mr"],
        symmetric_pairs=AFIDS_SYMMETRIC_PAIRS,
        splits=synth_splits(case_ids),
        description=(
            f"Synthetic T1w brain MRI with the 32 AFIDs: {len(case_ids)} random warps (affine and "
            f"elastic) of {template.name}, resampled to other spacings, orientations and fields "
            "of view, with new contrast, bias field and Rician noise; landmarks mapped exactly, "
            "those outside the field of view marked missing. Made by 'medlandmark convert "
            f"afids-synth' with seed {seed}"
            + ("" if variation == "default" else f" and variation {variation}")
            + ". Splits: 60 cases or more: test = cases 40-59, train = "
            "the others; fewer: the last third is test."
        ),
        reference=(
            "Lau JC et al. A framework for evaluating correspondence between brain images using "
            "anatomical fiducials. Human Brain Mapping 40(14):4163-4179, 2019; Fonov V et al. "
            "Unbiased average age-appropriate atlases for pediatric studies. NeuroImage "
            "54(1):313-327, 2011 (MNI152NLin2009cAsym)."
        ),
        license="AFIDs landmarks CC-BY-4.0; template images under the McGill/MNI licence.",
    )


def _sitk_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing, origin, direction = geometry.to_itk()
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _map_points(points_mm: np.ndarray, map_point) -> np.ndarray:
    points_mm = np.asarray(points_mm, dtype=np.float64)
    mapped = np.full_like(points_mm, np.nan)
    for k, point in enumerate(points_mm):
        if not np.isnan(point).any():
            mapped[k] = map_point(point)
    return mapped


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation about z, then y, then x (world axes) by the given angles."""
    x, y, z = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _signed_permutation(rng: np.random.Generator) -> np.ndarray:
    """One of the 24 axis-aligned orientations (a rotation: the anatomy is never mirrored)."""
    direction = np.zeros((3, 3))
    direction[rng.permutation(3), np.arange(3)] = rng.choice([-1.0, 1.0], 3)
    if np.linalg.det(direction) < 0:
        direction[:, 2] *= -1.0
    return direction


def _fade(grid: Geometry) -> np.ndarray:
    """0 at the grid's outermost points, rising smoothly to 1 at :data:`FIELD_PADDING_MM` from
    them (about the template box's faces)."""
    fade = np.ones(grid.shape)
    for axis, (n, spacing) in enumerate(zip(grid.shape, grid.spacing_mm, strict=True)):
        index = np.arange(n, dtype=np.float64)
        t = np.clip(np.minimum(index, n - 1 - index) * spacing / FIELD_PADDING_MM, 0.0, 1.0)
        shape = [n if a == axis else 1 for a in range(3)]
        fade = fade * (t * t * (3.0 - 2.0 * t)).reshape(shape)
    return fade


def _gradient_bound(displacement_mm: np.ndarray, spacing_mm: tuple[float, ...]) -> float:
    """An upper bound of the field's Lipschitz constant (mm/mm), from its finite differences."""
    squares = 0.0
    for axis, spacing in enumerate(spacing_mm):
        steepest = np.abs(np.diff(displacement_mm, axis=axis)).max(axis=(0, 1, 2)) / spacing
        squares += float(np.sum(steepest**2))
    return math.sqrt(squares)


def _within_budget(
    start: np.ndarray, stop: np.ndarray, centre: np.ndarray, max_voxels: int
) -> tuple[np.ndarray, np.ndarray]:
    """The box shrunk evenly around ``centre`` (inside the box) to at most ``max_voxels``."""
    shape = stop - start
    voxels = int(np.prod(shape))
    if voxels <= max_voxels:
        return start, stop
    new_shape = np.maximum(1, np.floor(shape * (max_voxels / voxels) ** (1 / 3))).astype(int)
    new_start = np.clip(np.round(centre - new_shape / 2).astype(int), start, stop - new_shape)
    return new_start, new_start + new_shape


def _cut(
    start: np.ndarray, stop: np.ndarray, landmarks: np.ndarray, crop: Crop
) -> tuple[np.ndarray, np.ndarray]:
    """The box cut across ``crop.axis`` at the ``crop.quantile`` of the landmarks' indices."""
    cut = float(np.quantile(landmarks[:, crop.axis], crop.quantile))
    start, stop = start.copy(), stop.copy()
    if crop.keep_low:
        stop[crop.axis] = min(max(math.floor(cut) + 1, start[crop.axis] + 1), stop[crop.axis])
    else:
        start[crop.axis] = max(min(math.ceil(cut), stop[crop.axis] - 1), start[crop.axis])
    return start, stop
