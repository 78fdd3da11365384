"""Procedural 2D "anatomy" for tests and the demo: a palm with three fingers, landmarks on its
features (fingertips, finger bases, palm corners), in varied pose, contrast and noise.

The image is rendered from a signed distance function evaluated through the inverse of each
case's pose, so the landmarks, mapped through the same pose, are exact.
"""

from __future__ import annotations

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
    "tip_left", "tip_middle", "tip_right", "base_left", "base_middle", "base_right",
    "palm_left", "palm_right", "palm_bottom",
]  # fmt: skip


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


def _capsule_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float) -> np.ndarray:
    segment = end - start
    t = np.clip(((points - start) @ segment) / (segment @ segment), 0.0, 1.0)
    return np.linalg.norm(points - (start + t[..., None] * segment), axis=-1) - radius


def _shape_distance(points: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) to the palm-and-fingers shape."""
    palm = (np.linalg.norm((points - _PALM_CENTRE) / _PALM_RADII, axis=-1) - 1.0) * _PALM_RADII.min()
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


def make_synthetic_dataset(
    out: str | Path, num_cases: int = 24, size_px: int = 128, spacing_mm: float = 0.5, seed: int = 0
) -> Path:
    """Write a synthetic 2D dataset folder (PNG images, spacing in dataset.json, CSV landmarks)."""
    out = Path(out)
    geometry = Geometry.identity((size_px, size_px), (spacing_mm, spacing_mm))
    case_ids = [f"case{i:03d}" for i in range(num_cases)]
    for index, case_id in enumerate(progress(case_ids, description="synthetic cases")):
        image, landmarks_xy = synthetic_case(seed * 100_003 + index, size_px)
        write_image(out / "images" / f"{case_id}.png", image, geometry)
        points_mm = index_to_world(landmarks_xy[:, ::-1], geometry)
        write_landmarks(out / "landmarks" / f"{case_id}.csv", LandmarkSet(SYNTHETIC_LANDMARKS, points_mm))
    split = int(round(num_cases * 0.75))
    spec = DatasetSpec(
        name="synthetic-hands-2d", spatial_dims=2, landmarks=SYNTHETIC_LANDMARKS,
        modalities=["xray"], spacing_mm=[spacing_mm, spacing_mm],
        symmetric_pairs=[("tip_left", "tip_right"), ("base_left", "base_right"), ("palm_left", "palm_right")],
        splits={"train": case_ids[:split], "test": case_ids[split:]},
        description="Procedural palm-and-fingers images with exact landmarks (medlandmark demo).",
        license="CC0-1.0",
    )  # fmt: skip
    write_spec(out, spec)
    return out
