"""Voxels re-oriented while the header stays: the candidates of prediction's orientation search.

An :class:`Orientation` permutes the spatial array axes, then flips some of them. Applied to an
image it moves the voxels and keeps the geometry's origin and direction (the sizes and spacings
follow their axes), which is what a mirrored radiograph or a volume whose header is flipped
looks like to the toolkit; :meth:`Orientation.index_back` maps array indices found in the moved
image back to the image as given, so its world coordinates stay those of the given header.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from medlandmark.io.geometry import Geometry, index_to_world, left_right_axis, world_to_index
from medlandmark.io.images import ImageData


@dataclass(frozen=True)
class Orientation:
    """Output axis ``i`` is input axis ``axes[i]``, reversed where ``flips[i]``; ``name`` says
    what it does to the image as seen."""

    axes: tuple[int, ...]
    flips: tuple[bool, ...]
    name: str

    @property
    def is_identity(self) -> bool:
        return self.axes == tuple(range(len(self.axes))) and not any(self.flips)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial shape after the move."""
        return tuple(shape[a] for a in self.axes)

    def array(self, voxels: np.ndarray) -> np.ndarray:
        """Voxels ``(C, *spatial)`` moved."""
        moved = np.transpose(voxels, (0, *(1 + a for a in self.axes)))
        flipped = tuple(1 + i for i, flip in enumerate(self.flips) if flip)
        return np.ascontiguousarray(np.flip(moved, flipped) if flipped else moved)

    def geometry(self, geometry: Geometry) -> Geometry:
        """The moved image's geometry: the header's origin and direction, sizes and spacings
        following their axes."""
        return replace(
            geometry,
            shape=self.shape(tuple(geometry.shape)),
            spacing_mm=tuple(geometry.spacing_mm[a] for a in self.axes),
        )

    def image(self, image: ImageData) -> ImageData:
        """The image with its voxels moved and its header kept."""
        return ImageData(self.array(image.array), self.geometry(image.geometry))

    def index(self, index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Indices ``(K, D)`` in an image of spatial ``shape`` -> in the moved image."""
        moved = np.asarray(index, dtype=np.float64)[:, list(self.axes)]
        out_shape = self.shape(shape)
        for i, flip in enumerate(self.flips):
            if flip:
                moved[:, i] = out_shape[i] - 1 - moved[:, i]
        return moved

    def index_back(self, index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Indices ``(K, D)`` in the moved image -> in the image of spatial ``shape``."""
        unflipped = np.asarray(index, dtype=np.float64).copy()
        out_shape = self.shape(shape)
        for i, flip in enumerate(self.flips):
            if flip:
                unflipped[:, i] = out_shape[i] - 1 - unflipped[:, i]
        back = np.empty_like(unflipped)
        back[:, list(self.axes)] = unflipped
        return back

    def world_back(self, points_mm: np.ndarray, geometry: Geometry) -> np.ndarray:
        """World points ``(K, D)`` found in the moved image -> where they lie in the image as
        given (of ``geometry``); NaN rows stay NaN."""
        moved_index = world_to_index(points_mm, self.geometry(geometry))
        return index_to_world(self.index_back(moved_index, tuple(geometry.shape)), geometry)


def candidate_orientations(geometry: Geometry, turns: bool) -> list[Orientation]:
    """The image as given first, then every flip of its axes, and with ``turns`` (2D only)
    every quarter turn too: the 8 symmetries of a rectangle (4 mirrors and turns in 2D, 8 axis
    flips in 3D)."""
    ndim = geometry.ndim
    lr = left_right_axis(geometry)
    orders = [tuple(range(ndim))]
    if turns and ndim == 2:
        orders.append((1, 0))
    found = []
    for axes in orders:
        for flips in itertools.product((False, True), repeat=ndim):
            found.append(Orientation(axes, flips, _name(axes, flips, lr)))
    return found


def _name(axes: tuple[int, ...], flips: tuple[bool, ...], lr: int) -> str:
    """What the move does to the image as seen (2D: mirrors and turns; 3D: flipped axes)."""
    if len(axes) == 3:
        flipped = [f"axis {i}" for i, flip in enumerate(flips) if flip]
        return "as given" if not flipped else "flipped " + " and ".join(flipped)
    ud = 1 - lr
    if axes == (0, 1):
        return {
            (False, False): "as given",
            (True, True): "turned 180 degrees",
        }.get(flips, "mirrored left-right" if flips[lr] else "mirrored up-down")
    # a transpose: a quarter turn, or a mirror across a diagonal
    if flips[lr] != flips[ud]:
        return "turned 90 degrees" if flips[ud] else "turned 270 degrees"
    return "mirrored across the diagonal" if not flips[0] else "mirrored across the other diagonal"
