"""The one place where voxel indices and world millimetres are converted.

World coordinates follow ITK: LPS millimetres (x grows to the patient's left, y to posterior,
z to superior); a 2D image's world is the first two LPS axes. Indices are continuous, the
centre of voxel ``i`` being at index ``i``.

A :class:`Geometry` is written in *array axis order*, the order of the axes of the NumPy array
that holds the voxels (SimpleITK's ``GetArrayFromImage`` order: ``(z, y, x)`` in 3D, ``(row,
column)`` in 2D). File formats that store pixel positions as ``x, y[, z]`` use ITK index order,
the reverse; :func:`itk_index_to_world` and :func:`world_to_itk_index` serve them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medlandmark.errors import ImageError

DIRECTION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of an array lie in the world, axis by axis in array order.

    ``direction[:, i]`` is the world (LPS) unit vector along array axis ``i``; ``origin_mm`` is
    the world position of the centre of voxel ``(0, ..., 0)``; ``shape`` is the spatial shape.
    """

    spacing_mm: tuple[float, ...]
    origin_mm: tuple[float, ...]
    direction: tuple[tuple[float, ...], ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        ndim = len(self.shape)
        if ndim not in (2, 3):
            raise ImageError(f"only 2D and 3D images are supported, got {ndim} spatial axes")
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "origin_mm", tuple(float(o) for o in self.origin_mm))
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        rows = tuple(tuple(float(v) for v in row) for row in np.asarray(self.direction, float))
        object.__setattr__(self, "direction", rows)
        if len(self.spacing_mm) != ndim or len(self.origin_mm) != ndim or len(rows) != ndim:
            raise ImageError(
                f"geometry has {ndim} axes but spacing {self.spacing_mm}, origin "
                f"{self.origin_mm} and a {len(rows)}-row direction do not all match"
            )
        if any(len(row) != ndim for row in rows):
            raise ImageError(f"direction must be {ndim}x{ndim}, got {rows}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64)

    @property
    def index_to_world_matrix(self) -> np.ndarray:
        """Matrix ``A`` with ``world = origin + A @ index`` (direction times spacing)."""
        return self.direction_matrix * np.asarray(self.spacing_mm)[None, :]

    @property
    def extent_mm(self) -> tuple[float, ...]:
        """Physical size along each array axis, from the first voxel's edge to the last's."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing_mm, strict=True))

    def problems(self) -> list[str]:
        """What makes this geometry unusable (bad spacing, non-orthonormal direction...)."""
        found = []
        spacing = np.asarray(self.spacing_mm)
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            found.append(f"spacing must be positive and finite, got {self.spacing_mm} mm")
        if not np.all(np.isfinite(self.origin_mm)):
            found.append(f"origin must be finite, got {self.origin_mm}")
        direction = self.direction_matrix
        if not np.all(np.isfinite(direction)) or not np.allclose(
            direction.T @ direction, np.eye(self.ndim), atol=DIRECTION_TOLERANCE
        ):
            found.append(f"direction matrix is not orthonormal: {self.direction}")
        if any(n < 1 for n in self.shape):
            found.append(f"image has an empty axis: shape {self.shape}")
        return found

    def validated(self, path: object = None) -> Geometry:
        """Return self, or raise :class:`ImageError` listing every problem."""
        found = self.problems()
        if found:
            raise ImageError("; ".join(found), path)
        return self

    def contains_index(self, index: np.ndarray) -> np.ndarray:
        """True for each (array-order) index inside the image, voxel edges included."""
        index = np.asarray(index, dtype=np.float64)
        upper = np.asarray(self.shape, dtype=np.float64) - 0.5
        return np.all((index >= -0.5) & (index <= upper), axis=-1)

    def contains_world(self, points_mm: np.ndarray) -> np.ndarray:
        """True for each world point inside the image; NaN points are not inside."""
        return self.contains_index(world_to_index(points_mm, self))

    def depth_inside_mm(self, points_mm: np.ndarray) -> np.ndarray:
        """``(N,)`` distance in mm from each world point to the nearest face of the image's box
        (the voxels' outer edges); outside, minus the largest overshoot past a face; NaN
        points give NaN."""
        index = world_to_index(points_mm, self)
        size = np.asarray(self.shape, dtype=np.float64)
        per_axis = np.minimum(index + 0.5, size - 0.5 - index) * np.asarray(self.spacing_mm)
        return per_axis.min(axis=-1)

    def to_dict(self) -> dict:
        return {
            "spacing_mm": list(self.spacing_mm),
            "origin_mm": list(self.origin_mm),
            "direction": [list(row) for row in self.direction],
            "shape": list(self.shape),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(
            spacing_mm=tuple(data["spacing_mm"]),
            origin_mm=tuple(data["origin_mm"]),
            direction=tuple(tuple(row) for row in data["direction"]),
            shape=tuple(data["shape"]),
        )

    @classmethod
    def identity(cls, shape: Sequence[int], spacing_mm: Sequence[float] | None = None) -> Geometry:
        """Axis-aligned geometry with origin 0 (array axis ``i`` along world axis ``D-1-i``).

        This is the geometry SimpleITK gives an image with identity direction: array axis 0 is
        ``z`` (3D) or ``y`` (2D).
        """
        ndim = len(shape)
        spacing = tuple(spacing_mm) if spacing_mm is not None else (1.0,) * ndim
        direction = np.fliplr(np.eye(ndim))
        return cls(spacing, (0.0,) * ndim, tuple(map(tuple, direction)), tuple(shape))

    @classmethod
    def from_itk(
        cls,
        spacing_xyz: Sequence[float],
        origin_xyz: Sequence[float],
        direction_row_major: Sequence[float],
        size_xyz: Sequence[int],
    ) -> Geometry:
        """From ITK/SimpleITK conventions (spacing, size in x,y,z order; direction flat)."""
        ndim = len(size_xyz)
        direction_itk = np.asarray(direction_row_major, dtype=np.float64).reshape(ndim, ndim)
        return cls(
            spacing_mm=tuple(spacing_xyz)[::-1],
            origin_mm=tuple(origin_xyz),
            direction=tuple(map(tuple, direction_itk[:, ::-1])),
            shape=tuple(size_xyz)[::-1],
        )

    def to_itk(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """``(spacing_xyz, origin_xyz, direction_row_major)`` for SimpleITK's setters."""
        direction_itk = self.direction_matrix[:, ::-1]
        return self.spacing_mm[::-1], self.origin_mm, tuple(direction_itk.ravel())


def _as_points(points: np.ndarray, ndim: int) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.shape[-1] != ndim:
        raise ValueError(f"points have {points.shape[-1]} coordinates, geometry has {ndim} axes")
    return points


def index_to_world(index: np.ndarray, geometry: Geometry) -> np.ndarray:
    """World LPS mm of continuous array-order indices, shape ``(..., D)``; NaN stays NaN."""
    index = _as_points(index, geometry.ndim)
    return index @ geometry.index_to_world_matrix.T + np.asarray(geometry.origin_mm)


def world_to_index(points_mm: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Continuous array-order indices of world LPS mm points, shape ``(..., D)``."""
    points_mm = _as_points(points_mm, geometry.ndim)
    inverse = np.linalg.inv(geometry.index_to_world_matrix)
    return (points_mm - np.asarray(geometry.origin_mm)) @ inverse.T


def itk_index_to_world(index_xyz: np.ndarray, geometry: Geometry) -> np.ndarray:
    """World mm of indices in ITK order (``x, y[, z]`` = column, row[, slice]), as files store pixels."""
    return index_to_world(np.asarray(index_xyz, dtype=np.float64)[..., ::-1], geometry)


def world_to_itk_index(points_mm: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Indices in ITK order (``x, y[, z]``) of world mm points."""
    return world_to_index(points_mm, geometry)[..., ::-1]


def lps_to_ras(points_mm: np.ndarray) -> np.ndarray:
    """Flip the first two world axes: LPS <-> RAS is its own inverse, in 2D and 3D."""
    points = np.array(points_mm, dtype=np.float64, copy=True)
    points[..., :2] *= -1.0
    return points


ras_to_lps = lps_to_ras


def resampled_geometry(geometry: Geometry, shape: Sequence[int]) -> Geometry:
    """Geometry of the same field of view sampled on ``shape`` voxels (edges kept in place).

    New voxel ``j`` sits at old continuous index ``(j + 0.5) * N / M - 0.5`` per axis, which is
    what ``torch.nn.functional.interpolate(..., align_corners=False)`` samples.
    """
    old = np.asarray(geometry.shape, dtype=np.float64)
    new = np.asarray(shape, dtype=np.float64)
    ratio = old / new
    spacing = np.asarray(geometry.spacing_mm) * ratio
    origin = index_to_world(0.5 * ratio - 0.5, geometry)
    return Geometry(tuple(spacing), tuple(origin), geometry.direction, tuple(int(n) for n in shape))


def centred_geometry(
    centre_mm: Sequence[float],
    direction: np.ndarray,
    spacing_mm: Sequence[float],
    shape: Sequence[int],
) -> Geometry:
    """Geometry of a ``shape`` grid whose array axes run along ``direction``'s columns (world
    unit vectors) and whose centre (index ``(shape - 1) / 2``) lies at ``centre_mm``."""
    direction = np.asarray(direction, dtype=np.float64)
    half = (np.asarray(shape, dtype=np.float64) - 1) / 2
    origin = np.asarray(centre_mm, dtype=np.float64) - direction @ (np.asarray(spacing_mm) * half)
    return Geometry(
        tuple(float(s) for s in spacing_mm),
        tuple(origin),
        tuple(map(tuple, direction)),
        tuple(int(n) for n in shape),
    )


def transposed_geometry(geometry: Geometry, axes: Sequence[int]) -> Geometry:
    """Geometry of ``array.transpose(axes)`` (spatial axes only)."""
    axes = list(axes)
    direction = geometry.direction_matrix[:, axes]
    return Geometry(
        tuple(geometry.spacing_mm[a] for a in axes),
        geometry.origin_mm,
        tuple(map(tuple, direction)),
        tuple(geometry.shape[a] for a in axes),
    )


def canonical_axes(geometry: Geometry) -> tuple[list[int], list[bool]]:
    """The axis order and flips (no resampling) that bring an array nearest to the orientation
    of an ITK image with identity direction: array axis ``i`` along +world axis ``ndim - 1 - i``
    (``(z, y, x)`` running to S, P, L; a 2D image's rows to P and columns to L)."""
    ndim, direction = geometry.ndim, geometry.direction_matrix
    axes = max(
        itertools.permutations(range(ndim)),
        key=lambda order: sum(abs(direction[ndim - 1 - j, a]) for j, a in enumerate(order)),
    )
    flips = [bool(direction[ndim - 1 - j, a] < 0) for j, a in enumerate(axes)]
    return list(axes), flips


def reoriented_geometry(geometry: Geometry, axes: Sequence[int], flips: Sequence[bool]) -> Geometry:
    """Geometry of ``array.transpose(axes)`` flipped along each axis ``j`` with ``flips[j]``."""
    transposed = transposed_geometry(geometry, axes)
    last = np.array(
        [n - 1 if flip else 0 for n, flip in zip(transposed.shape, flips, strict=True)],
        dtype=np.float64,
    )
    direction = transposed.direction_matrix * np.where(flips, -1.0, 1.0)[None, :]
    origin = index_to_world(last, transposed)
    return Geometry(
        transposed.spacing_mm, tuple(origin), tuple(map(tuple, direction)), transposed.shape
    )


def cropped_geometry(geometry: Geometry, start: Sequence[int], shape: Sequence[int]) -> Geometry:
    """Geometry of ``array[start : start + shape]`` (``start`` may be negative: padding)."""
    origin = index_to_world(np.asarray(start, dtype=np.float64), geometry)
    return Geometry(geometry.spacing_mm, tuple(origin), geometry.direction, tuple(shape))


def left_right_axis(geometry: Geometry) -> int:
    """The array axis most aligned with the world left-right (LPS x) direction."""
    return int(np.argmax(np.abs(geometry.direction_matrix[0])))
