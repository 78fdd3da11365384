"""Procedural "anatomy" for tests and the demo, in varied pose, contrast and noise: in 2D a palm
with three fingers (landmarks on fingertips, finger bases, palm corners); in 3D a body with four
limbs and an inner organ (landmarks on limb tips, the organ's centre, the body's poles).

The image is rendered from a signed distance function evaluated through the inverse of each
case's pose, so the landmarks, mapped through the same pose, are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from medlandmark.console import progress
from medlandmark.datasets.dataset import DatasetSpec, write_spec
from medlandmark.io.geometry import Geometry, index_to_world
from medlandmark.io.images import write_image
from medlandmark.io.landmarks import LandmarkSet, write_landmarks

# Template shape in a unit frame (x right, y down), about 1 unit = a third of the field of view.
_PALM_CENTRE, _PALM_RADII = np.array([0.0, 0.35]), np.array([0.55, 0.45])
_FINGERS = [  # (base, tip, half width)
    (np.array([-0.38, 0.05]), np.array([-0.75, -0.70]), 0.10),
    (np.array([0.0, -0.08]), np.array([0.02, -0.95]), 0.11),
    (np.array([0.38, 0.05]), np.array([0.78, -0.62]), 0.10),
]
SYNTHETIC_LANDMARKS = [
    "tip_left",
    "tip_middle",
    "tip_right",
    "base_left",
    "base_middle",
    "base_right",
    "palm_left",
    "palm_right",
    "palm_bottom",
]


def template_landmarks() -> np.ndarray:
    """Landmark positions ``(9, 2)`` (x, y) in the template frame."""
    tips = [tip for _, tip, _ in _FINGERS]
    bases = [base for base, _, _ in _FINGERS]
    palm = [
        _PALM_CENTRE + [-_PALM_RADII[0], 0.0],
        _PALM_CENTRE + [_PALM_RADII[0], 0.0],
        _PALM_CENTRE + [0.0, _PALM_RADII[1]],
    ]
    return np.array(tips + bases + palm)


def _capsule_distance(
    points: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float
) -> np.ndarray:
    segment = end - start
    t = np.clip(((points - start) @ segment) / (segment @ segment), 0.0, 1.0)
    return np.linalg.norm(points - (start + t[..., None] * segment), axis=-1) - radius


def _shape_distance(points: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) to the palm-and-fingers shape."""
    palm = (
        np.linalg.norm((points - _PALM_CENTRE) / _PALM_RADII, axis=-1) - 1.0
    ) * _PALM_RADII.min()
    fingers = [_capsule_distance(points, b, t, r) for b, t, r in _FINGERS]
    return np.minimum.reduce([palm, *fingers])


def _pose(rng: np.random.Generator, size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Random similarity-plus-stretch from the template frame to pixel (x, y)."""
    angle = rng.uniform(-0.35, 0.35)
    scale = size_px / 3.2 * rng.uniform(0.85, 1.1)
    stretch = np.diag([rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = scale * rotation @ stretch
    offset = size_px / 2 + rng.uniform(-0.06, 0.06, 2) * size_px
    return matrix, offset


def synthetic_case(seed: int, size_px: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One image ``(size, size)`` uint8 and its landmarks ``(9, 2)`` as pixel (x, y) positions."""
    rng = np.random.default_rng(seed)
    matrix, offset = _pose(rng, size_px)
    rows, cols = np.mgrid[0:size_px, 0:size_px].astype(np.float64)
    pixel_xy = np.stack([cols, rows], axis=-1)
    template_xy = (pixel_xy - offset) @ np.linalg.inv(matrix).T
    edge_px = 1.2
    distance_px = _shape_distance(template_xy) * np.linalg.norm(matrix, 2) / np.sqrt(2)
    inside = 1.0 / (1.0 + np.exp(distance_px / edge_px))
    bone = 1.0 / (1.0 + np.exp((distance_px + 0.09 * size_px / 3.2) / edge_px))
    contrast, brightness = rng.uniform(0.5, 1.0), rng.uniform(0.05, 0.25)
    gradient = rng.uniform(-0.1, 0.1) * (cols - size_px / 2) / size_px
    image = brightness + gradient + contrast * (0.55 * inside + 0.35 * bone)
    image += rng.normal(0.0, rng.uniform(0.01, 0.05), image.shape)
    landmarks_xy = template_landmarks() @ matrix.T + offset
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), landmarks_xy


def write_synthetic_cases(
    out: Path,
    make_case: Callable[[int], tuple[np.ndarray, np.ndarray]],
    names: list[str],
    geometry: Geometry,
    suffixes: tuple[str, str],
    num_cases: int,
    seed: int,
) -> dict[str, list[str]]:
    """Write ``num_cases`` cases from ``make_case(case_seed) -> (array, landmarks as x, y[, z]
    indices)`` as ``images/caseNNN<suffix>`` and ``landmarks/caseNNN<suffix>``; returns the
    splits (the first three quarters train, the rest test)."""
    case_ids = [f"case{i:03d}" for i in range(num_cases)]
    image_suffix, landmark_suffix = suffixes
    description = "synthetic volumes" if geometry.ndim == 3 else "synthetic cases"
    for index, case_id in enumerate(progress(case_ids, description=description)):
        array, landmarks_itk = make_case(seed * 100_003 + index)
        write_image(out / "images" / f"{case_id}{image_suffix}", array, geometry)
        points_mm = index_to_world(landmarks_itk[:, ::-1], geometry)
        write_landmarks(
            out / "landmarks" / f"{case_id}{landmark_suffix}", LandmarkSet(names, points_mm)
        )
    split = int(round(num_cases * 0.75))
    return {"train": case_ids[:split], "test": case_ids[split:]}


def make_synthetic_dataset(
    out: str | Path, num_cases: int = 24, size_px: int = 128, spacing_mm: float = 0.5, seed: int = 0
) -> Path:
    """Write a synthetic 2D dataset folder (PNG images, spacing in dataset.json, CSV landmarks)."""
    out = Path(out)
    geometry = Geometry.identity((size_px, size_px), (spacing_mm, spacing_mm))
    splits = write_synthetic_cases(
        out,
        lambda case_seed: synthetic_case(case_seed, size_px),
        SYNTHETIC_LANDMARKS,
        geometry,
        (".png", ".csv"),
        num_cases,
        seed,
    )
    spec = DatasetSpec(
        name="synthetic-hands-2d",
        spatial_dims=2,
        landmarks=SYNTHETIC_LANDMARKS,
        modalities=["xray"],
        spacing_mm=[spacing_mm, spacing_mm],
        symmetric_pairs=[
            ("tip_left", "tip_right"),
            ("base_left", "base_right"),
            ("palm_left", "palm_right"),
        ],
        splits=splits,
        description="Procedural palm-and-fingers images with exact landmarks (medlandmark demo).",
        license="CC0-1.0",
    )
    write_spec(out, spec)
    return out


# 3D: a body with four limbs and a bright inner organ, no mirror symmetry, 1 unit = a third of
# the field of view; (x, y, z) template axes map to the volume's (column, row, slice).
_BODY_CENTRE, _BODY_RADII = np.zeros(3), np.array([0.6, 0.45, 0.42])
_LIMBS_3D = [  # (base, tip, radius)
    (np.array([-0.35, -0.2, 0.0]), np.array([-0.85, -0.75, 0.2]), 0.11),
    (np.array([0.35, -0.2, 0.0]), np.array([0.8, -0.7, -0.15]), 0.11),
    (np.array([-0.25, 0.3, 0.0]), np.array([-0.45, 0.95, 0.1]), 0.13),
    (np.array([0.3, 0.3, 0.0]), np.array([0.55, 0.9, -0.1]), 0.13),
]
_ORGAN_CENTRE, _ORGAN_RADIUS = np.array([0.18, 0.02, 0.12]), 0.16
SYNTHETIC_LANDMARKS_3D = [
    "tip_upper_left",
    "tip_upper_right",
    "tip_lower_left",
    "tip_lower_right",
    "organ_centre",
    "body_top",
    "body_bottom",
]


def template_landmarks_3d() -> np.ndarray:
    """Landmark positions ``(7, 3)`` (x, y, z) in the 3D template frame."""
    tips = [tip for _, tip, _ in _LIMBS_3D]
    poles = [_BODY_CENTRE + [0.0, 0.0, _BODY_RADII[2]], _BODY_CENTRE - [0.0, 0.0, _BODY_RADII[2]]]
    return np.array([*tips, _ORGAN_CENTRE, *poles])


def _body_distance(points: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) to the body-and-limbs shape."""
    body = (
        np.linalg.norm((points - _BODY_CENTRE) / _BODY_RADII, axis=-1) - 1.0
    ) * _BODY_RADII.min()
    limbs = [_capsule_distance(points, b, t, r) for b, t, r in _LIMBS_3D]
    return np.minimum.reduce([body, *limbs])


def _rotation_3d(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    rotation = np.eye(3)
    for axis in range(3):
        angle = rng.uniform(-max_angle, max_angle)
        c, s = np.cos(angle), np.sin(angle)
        plane = [a for a in range(3) if a != axis]
        step = np.eye(3)
        step[np.ix_(plane, plane)] = [[c, -s], [s, c]]
        rotation = step @ rotation
    return rotation


def synthetic_volume_case(seed: int, size_vox: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One volume ``(size, size, size)`` uint8 in array order (z, y, x) and its landmarks
    ``(7, 3)`` as voxel (x, y, z) positions."""
    rng = np.random.default_rng(seed)
    stretch = np.diag(rng.uniform(0.9, 1.1, 3))
    matrix = size_vox / 3.2 * rng.uniform(0.85, 1.05) * _rotation_3d(rng, 0.3) @ stretch
    offset = size_vox / 2 + rng.uniform(-0.05, 0.05, 3) * size_vox
    slices, rows, cols = np.mgrid[0:size_vox, 0:size_vox, 0:size_vox].astype(np.float64)
    voxel_xyz = np.stack([cols, rows, slices], axis=-1)
    template_xyz = (voxel_xyz - offset) @ np.linalg.inv(matrix).T
    to_voxels = np.linalg.norm(matrix, 2) / np.sqrt(3)
    edge_vox = 0.8
    inside = 1.0 / (1.0 + np.exp(_body_distance(template_xyz) * to_voxels / edge_vox))
    organ_distance = np.linalg.norm(template_xyz - _ORGAN_CENTRE, axis=-1) - _ORGAN_RADIUS
    organ = 1.0 / (1.0 + np.exp(organ_distance * to_voxels / edge_vox))
    contrast, brightness = rng.uniform(0.5, 1.0), rng.uniform(0.05, 0.2)
    image = brightness + contrast * (0.45 * inside + 0.4 * organ)
    image *= 1.0 + rng.uniform(-0.15, 0.15) * (slices - size_vox / 2) / size_vox  # bias along z
    image += rng.normal(0.0, rng.uniform(0.01, 0.04), image.shape)
    landmarks_xyz = template_landmarks_3d() @ matrix.T + offset
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), landmarks_xyz


def make_synthetic_volume_dataset(
    out: str | Path, num_cases: int = 24, size_vox: int = 32, spacing_mm: float = 2.0, seed: int = 0
) -> Path:
    """Write a synthetic 3D dataset folder (NIfTI volumes, Slicer .mrk.json landmarks)."""
    out = Path(out)
    geometry = Geometry.identity((size_vox,) * 3, (spacing_mm,) * 3)
    splits = write_synthetic_cases(
        out,
        lambda case_seed: synthetic_volume_case(case_seed, size_vox),
        SYNTHETIC_LANDMARKS_3D,
        geometry,
        (".nii.gz", ".mrk.json"),
        num_cases,
        seed,
    )
    spec = DatasetSpec(
        name="synthetic-body-3d",
        spatial_dims=3,
        landmarks=SYNTHETIC_LANDMARKS_3D,
        modalities=["ct"],
        splits=splits,
        description="Procedural body-with-limbs volumes with exact landmarks (medlandmark demo --3d).",
        license="CC0-1.0",
    )
    write_spec(out, spec)
    return out
