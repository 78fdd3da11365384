"""Pictures for the review editor: a 2D image, or a slice of a volume on a world-aligned plane,
as PNG, with the map from its pixels to world millimetres.

A :class:`View` says where pixel ``(column, row)`` (its centre) lies:
``world = origin_mm + column * column_mm + row * row_mm``. The editor turns a click or a drag
into millimetres with it and nothing else. Slices of a volume are resampled on planes aligned
with the world (LPS) axes, whatever the volume's own direction: axial (columns to the patient's
left, rows to posterior), coronal (columns left, rows down) and sagittal (columns posterior,
rows down), so that the patient's right is on the screen's left as radiologists view it.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from PIL import Image

from medlandmark.errors import MedlandmarkError
from medlandmark.io.geometry import Geometry
from medlandmark.io.images import ImageData

# plane -> (world axis along columns, sign), (world axis along rows, sign), normal world axis
PLANES = {
    "axial": ((0, 1.0), (1, 1.0), 2),
    "coronal": ((0, 1.0), (2, -1.0), 1),
    "sagittal": ((1, 1.0), (2, -1.0), 0),
}
WINDOW_PERCENTILES = (0.5, 99.5)
MAX_SLICE_PIXELS = 1024  # along one side of a slice


@dataclass(frozen=True)
class View:
    """How a picture's pixels lie in the world: size, and position of pixel centres."""

    width: int
    height: int
    origin_mm: tuple[float, ...]
    column_mm: tuple[float, ...]
    row_mm: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def world(self, column: float, row: float) -> np.ndarray:
        """World position (mm) of a point of the picture given in pixels."""
        origin, across, down = (
            np.asarray(v) for v in (self.origin_mm, self.column_mm, self.row_mm)
        )
        return origin + column * across + row * down


def default_window(image: ImageData) -> tuple[float, float]:
    """A display window (low, high) that ignores the extreme half percent at each end."""
    values = np.asarray(image.array[0], dtype=np.float64)
    step = max(1, values.size // 1_000_000)  # percentiles of a sample: fast on big volumes
    low, high = np.percentile(values.ravel()[::step], WINDOW_PERCENTILES)
    return (float(low), float(high) if high > low else float(low) + 1.0)


def image_view(geometry: Geometry) -> View:
    """The :class:`View` of a 2D image shown as stored: columns along array axis 1."""
    if geometry.ndim != 2:
        raise MedlandmarkError(f"a {geometry.ndim}D image is shown as slices, not whole")
    matrix = geometry.index_to_world_matrix
    rows, columns = geometry.shape
    return View(
        columns,
        rows,
        tuple(geometry.origin_mm),
        tuple(matrix[:, 1].tolist()),
        tuple(matrix[:, 0].tolist()),
    )


def image_png(image: ImageData, window: tuple[float, float]) -> bytes:
    """A 2D image as PNG, grey (or RGB for three channels), ``window`` mapped to 0-255."""
    if image.ndim != 2:
        raise MedlandmarkError(f"a {image.ndim}D image is shown as slices, not whole")
    channels = image.array[:3] if image.channels == 3 else image.array[:1]
    pixels = np.moveaxis(_windowed(channels, window), 0, -1)
    return _png(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def slice_view(geometry: Geometry, plane: str, point_mm: np.ndarray) -> View:
    """The :class:`View` of the world-aligned ``plane`` through ``point_mm`` covering the
    volume's bounding box, at its finest spacing (coarser for very large volumes)."""
    if plane not in PLANES:
        raise MedlandmarkError(f"unknown plane '{plane}' (use {', '.join(PLANES)})")
    if geometry.ndim != 3:
        raise MedlandmarkError("slices are for 3D images")
    (across, across_sign), (down, down_sign), _ = PLANES[plane]
    low, high = _world_box(geometry)
    size = high - low
    pixel_mm = max(min(geometry.spacing_mm), float(size.max()) / MAX_SLICE_PIXELS)
    origin = np.array(point_mm, dtype=np.float64)
    for axis, sign in ((across, across_sign), (down, down_sign)):
        origin[axis] = low[axis] if sign > 0 else high[axis]
    column, row = np.zeros(3), np.zeros(3)
    column[across], row[down] = across_sign * pixel_mm, down_sign * pixel_mm
    width = int(np.floor(size[across] / pixel_mm)) + 1
    height = int(np.floor(size[down] / pixel_mm)) + 1
    return View(width, height, tuple(origin.tolist()), tuple(column.tolist()), tuple(row.tolist()))


def slice_png(image: ImageData, view: View, window: tuple[float, float]) -> bytes:
    """The volume's first channel resampled (linearly) on ``view``'s plane, as a grey PNG;
    outside the volume is black."""
    volume = sitk.GetImageFromArray(np.ascontiguousarray(image.array[0], dtype=np.float32))
    spacing, origin, direction = image.geometry.to_itk()
    volume.SetSpacing(spacing)
    volume.SetOrigin(origin)
    volume.SetDirection(direction)
    across, down = np.asarray(view.column_mm), np.asarray(view.row_mm)
    pixel_mm = float(np.linalg.norm(across))
    normal = np.cross(across, down)
    axes = np.stack([across, down, normal / np.linalg.norm(normal) * pixel_mm]) / pixel_mm
    resampled = sitk.Resample(
        volume,
        [view.width, view.height, 1],
        sitk.Transform(),
        sitk.sitkLinear,
        view.origin_mm,
        [pixel_mm] * 3,
        tuple(axes.T.ravel()),
        float(window[0]),
        sitk.sitkFloat32,
    )
    pixels = sitk.GetArrayFromImage(resampled)[0]  # (rows, columns)
    return _png(_windowed(pixels[None], window)[0])


def _world_box(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest world coordinates of the volume's voxel centres, per world axis."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in geometry.shape], indexing="ij"))
    corners = corners.reshape(geometry.ndim, -1).T
    world = np.asarray(geometry.origin_mm) + corners @ geometry.index_to_world_matrix.T
    return world.min(axis=0), world.max(axis=0)


def _windowed(pixels: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    scaled = (np.asarray(pixels, dtype=np.float64) - low) / max(high - low, 1e-9)
    return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
