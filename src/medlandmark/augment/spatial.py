"""Random spatial transforms of a batch of patches that move the landmarks exactly alike.

A transform maps OUTPUT patch voxel coordinates to INPUT (source crop) voxel coordinates, both
continuous indices in array axis order (the centre of voxel ``i`` at ``i``)::

    x_in = c_in + t + L @ (x_out + u(x_out) - c_out)

``c_out = (P - 1) / 2`` is the patch centre and ``c_in = (S - P) // 2 + (P - 1) / 2`` the centre
of the integer centre crop of the source (equal to ``(S - 1) / 2`` when ``S - P`` is even), so
the identity transform is an exact centre crop. ``t`` is the translation,
``L = rotation @ shear @ diag(1 / zoom) @ mirror`` and ``u`` a smooth elastic displacement in
output voxels, interpolated (bi/trilinear) from a coarse grid of control points spanning the
patch. Images are sampled with ``grid_sample``; landmarks go the other way: the affine part is
inverted analytically and ``x + u(x) = w`` is solved by fixed-point iteration, evaluating ``u``
with the same interpolation as the image, so both follow the very same map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from medlandmark.io.landmarks import pair_permutation

if TYPE_CHECKING:
    from medlandmark.augment import AugmentConfig

MAX_INVERSE_RESIDUAL_VOXELS = 0.05
INVERSE_TOLERANCE_VOXELS = 1e-3
INVERSE_MAX_ITERATIONS = 64
_CHECK_EVERY = 8


@dataclass
class SpatialTransform:
    """One random output -> input voxel map per sample of a batch (see the module docstring)."""

    matrix: Tensor  # (B, D, D) L
    offset: Tensor  # (B, D) o, with x_in = L @ (x_out + u(x_out)) + o
    control: Tensor | None  # (B, D, *n) displacement at the control points, output voxels
    mirrored: Tensor  # (B,) bool
    patch_size: tuple[int, ...]
    crop_size: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    def displacement(self, index: Tensor | None = None) -> Tensor | None:
        """The elastic displacement ``u`` on the patch voxels, ``(B, D, *P)``, or None."""
        if self.control is None:
            return None
        control = self.control if index is None else self.control[index]
        mode = "bilinear" if self.ndim == 2 else "trilinear"
        return F.interpolate(control, size=self.patch_size, mode=mode, align_corners=True)

    def grid(self, index: Tensor | None = None) -> Tensor:
        """``grid_sample`` grid ``(B, *P, D)`` (normalised, reversed axes) of the source crop."""
        matrix = self.matrix if index is None else self.matrix[index]
        offset = self.offset if index is None else self.offset[index]
        batch, ndim = matrix.shape[0], self.ndim
        # normalise x_in to [-1, 1] (align_corners=True) and reverse the axes, in the matrix
        scale = 2.0 / torch.tensor(
            [max(s - 1, 1) for s in self.crop_size], dtype=matrix.dtype, device=matrix.device
        )
        norm_matrix = (scale[:, None] * matrix).flip(1)
        grid = (scale * offset - 1.0).flip(-1).reshape(batch, *([1] * ndim), ndim)
        for axis, n in enumerate(self.patch_size):  # the affine part is separable: one sum per axis
            shape = [batch] + [1] * ndim + [ndim]
            shape[1 + axis] = n
            steps = torch.arange(n, dtype=matrix.dtype, device=matrix.device)
            grid = grid + (steps[None, :, None] * norm_matrix[:, None, :, axis]).reshape(shape)
        if self.control is not None:  # M u(x) = interpolated (M u) at the control points
            control = self.control if index is None else self.control[index]
            warped = torch.einsum("bij,bj...->bi...", norm_matrix, control.to(matrix.dtype))
            mode = "bilinear" if ndim == 2 else "trilinear"
            grid = grid + F.interpolate(
                warped, size=self.patch_size, mode=mode, align_corners=True
            ).movedim(1, -1)
        return grid

    def sample(self, images: Tensor, padding_mode: str = "zeros") -> Tensor:
        """The transformed patches ``(B, C, *P)`` of source crops ``(B, C, *S)``, same dtype.

        Samples whose transform is a whole-voxel shift (and flip) are copied exactly; the others
        are interpolated (bi/trilinear) in float32 (float64 for float64 images).
        """
        work = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
        out_dtype = images.dtype if images.is_floating_point() else work
        out = images.new_empty((*images.shape[:2], *self.patch_size), dtype=out_dtype)
        exact = self._exact_slices()
        for b, slices in enumerate(exact):
            if slices is not None:
                region, flips = slices
                out[b] = images[(b, slice(None), *region)].flip(flips).to(out_dtype)
        todo = [b for b, slices in enumerate(exact) if slices is None]
        if todo:
            index = torch.tensor(todo, device=images.device)
            grid = self.grid(index).to(work)
            source = images[index].to(work)
            sampled = F.grid_sample(
                source, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True
            )
            out[index] = sampled.to(out_dtype)
        return out

    def _exact_slices(self) -> list[tuple[tuple[slice, ...], list[int]] | None]:
        """Per sample: (source slices, flipped dims) if the map is a whole-voxel shift and flip."""
        matrix, offset = self.matrix.detach().cpu(), self.offset.detach().cpu()
        elastic = torch.zeros(matrix.shape[0], dtype=torch.bool)
        if self.control is not None:
            elastic = self.control.detach().flatten(1).abs().amax(1).cpu() > 0
        result: list[tuple[tuple[slice, ...], list[int]] | None] = []
        for b in range(matrix.shape[0]):
            diagonal = matrix[b].diagonal()
            o = offset[b]
            aligned = (
                not elastic[b]
                and torch.equal(matrix[b], torch.diag(diagonal))
                and bool((diagonal.abs() == 1).all())
                and bool((o == o.round()).all())
            )
            if not aligned:
                result.append(None)
                continue
            region, flips = [], []
            for axis, (p, s) in enumerate(zip(self.patch_size, self.crop_size, strict=True)):
                start = int(o[axis]) if diagonal[axis] > 0 else int(o[axis]) - (p - 1)
                if start < 0 or start + p > s:
                    break
                region.append(slice(start, start + p))
                if diagonal[axis] < 0:
                    flips.append(axis + 1)
            result.append((tuple(region), flips) if len(region) == self.ndim else None)
        return result

    def elastic_at(self, points: Tensor) -> Tensor:
        """``u`` at continuous output positions ``(B, K, D)``, interpolated like the image."""
        if self.control is None:
            return torch.zeros_like(points)
        batch, count, ndim = points.shape
        scale = 2.0 / torch.tensor(
            [max(p - 1, 1) for p in self.patch_size], dtype=points.dtype, device=points.device
        )
        grid = (points * scale - 1.0).flip(-1).reshape(batch, count, *([1] * (ndim - 1)), ndim)
        control = self.control.to(points.dtype)
        u = F.grid_sample(control, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return u.reshape(batch, ndim, count).transpose(1, 2)

    def points_to_input(self, points: Tensor) -> Tensor:
        """Source crop coordinates ``(B, K, D)`` of output patch coordinates (the forward map)."""
        work = _point_dtype(points)
        x = points.to(work)
        warped = x + self.elastic_at(x)
        return (
            torch.matmul(warped, self.matrix.to(work).transpose(1, 2))
            + self.offset.to(work)[:, None]
        ).to(points.dtype)

    def points_to_output(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Output patch coordinates of source crop coordinates ``(B, K, D)``, and the residual.

        Rows that are missing, fall outside ``[-0.5, P - 0.5]`` of the patch or whose elastic
        inversion left a residual above ``MAX_INVERSE_RESIDUAL_VOXELS`` come back NaN. The
        residual ``(B, K)`` is ``max |x + u(x) - w|`` in output voxels (0 without elastic).
        """
        work = _point_dtype(points)
        if points.shape[1] == 0:
            return points.clone(), points.new_zeros(points.shape[:2], dtype=work)
        y = points.to(work)
        missing = ~torch.isfinite(y).all(-1)
        y = torch.where(missing[..., None], torch.zeros_like(y), y)
        matrix, offset = self.matrix.to(work), self.offset.to(work)
        w = torch.linalg.solve(matrix, (y - offset[:, None]).transpose(1, 2)).transpose(1, 2)
        x, residual = self._invert_elastic(w)
        patch = torch.tensor(self.patch_size, dtype=work, device=y.device)
        inside = ((x >= -0.5) & (x <= patch - 0.5)).all(-1)
        keep = ~missing & inside & (residual < MAX_INVERSE_RESIDUAL_VOXELS)
        x = torch.where(keep[..., None], x, torch.full_like(x, math.nan))
        return x.to(points.dtype), residual

    def _invert_elastic(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` with ``x + u(x) = w`` by fixed-point iteration, and ``max |x + u(x) - w|``."""
        if self.control is None:
            return w, torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device)
        x = w - self.elastic_at(w)
        for iteration in range(1, INVERSE_MAX_ITERATIONS):
            step = w - self.elastic_at(x)
            change = (step - x).abs()
            x = step
            if iteration % _CHECK_EVERY == 0 and float(change.max()) < INVERSE_TOLERANCE_VOXELS:
                break
        residual = (x + self.elastic_at(x) - w).abs().amax(-1)
        return x, residual


def _point_dtype(points: Tensor) -> torch.dtype:
    return torch.float64 if points.dtype == torch.float64 else torch.float32


def _draw(generator: torch.Generator | None, shape: Sequence[int], device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=source).to(device)


def normal(generator: torch.Generator | None, shape: Sequence[int], device: torch.device) -> Tensor:
    """Standard normal numbers drawn on the generator's device, returned on ``device``."""
    source = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=source).to(device)


def uniform(
    generator: torch.Generator | None,
    shape: Sequence[int],
    low: float,
    high: float,
    device: torch.device,
) -> Tensor:
    """Uniform numbers in ``[low, high)``, float32 on ``device``."""
    return low + (high - low) * _draw(generator, shape, device)


def chance(generator: torch.Generator | None, batch: int, p: float, device: torch.device) -> Tensor:
    """``(batch,)`` booleans, each true with probability ``p``."""
    return _draw(generator, (batch,), device) < p


def plane_rotation(angle: Tensor, i: int, j: int, ndim: int) -> Tensor:
    """``(B, D, D)`` rotations by ``angle`` (radians) in the plane of array axes ``i`` and ``j``."""
    rotation = torch.eye(ndim, dtype=angle.dtype, device=angle.device).repeat(angle.shape[0], 1, 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation[:, i, i], rotation[:, j, j] = cos, cos
    rotation[:, i, j], rotation[:, j, i] = -sin, sin
    return rotation


def rotation_matrices(angles: Tensor) -> Tensor:
    """Rotations from ``(B, 1)`` angles (2D) or ``(B, 3)`` angles about array axes 0, 1, 2 (3D)."""
    if angles.shape[1] == 1:
        return plane_rotation(angles[:, 0], 0, 1, 2)
    planes = ((1, 2), (0, 2), (0, 1))  # rotation about axis a turns the other two
    rotation = plane_rotation(angles[:, 0], *planes[0], 3)
    for axis in (1, 2):
        rotation = rotation @ plane_rotation(angles[:, axis], *planes[axis], 3)
    return rotation


def crop_centre(crop_size: Sequence[int], patch_size: Sequence[int]) -> list[float]:
    """Source coordinate of the patch centre for the identity: the integer centre crop's centre."""
    return [(s - p) // 2 + (p - 1) / 2 for s, p in zip(crop_size, patch_size, strict=True)]


def gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised 1D Gaussian of ``2 * radius + 1`` taps."""
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def smooth_control(noise: Tensor, sigma_cells: float = 1.0) -> Tensor:
    """Separable Gaussian smoothing of a control grid ``(B, D, *n)`` (replicated edges)."""
    ndim = noise.dim() - 2
    radius = max(1, math.ceil(2 * sigma_cells))
    kernel = gaussian_kernel(sigma_cells, radius, noise.dtype, noise.device)
    channels = noise.shape[1]
    conv = (F.conv2d, F.conv3d)[ndim - 2]
    for axis in range(ndim):
        shape = [1] * ndim
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).repeat(channels, 1, *([1] * ndim))
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = radius
        noise = conv(F.pad(noise, pad, mode="replicate"), weight, groups=channels)
    return noise


def control_grid_size(patch_size: Sequence[int], spacing_voxels: float) -> list[int]:
    """Control points per axis: about ``spacing_voxels`` apart, spanning the patch, at least 2."""
    return [max(2, math.ceil((p - 1) / spacing_voxels) + 1) for p in patch_size]


def random_elastic_control(
    batch: int,
    patch_size: Sequence[int],
    config: AugmentConfig,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor | None:
    """Random smooth control displacements ``(B, D, *n)``; largest component = the magnitude."""
    if config.p_elastic <= 0:
        return None
    ndim = len(patch_size)
    grid = control_grid_size(patch_size, config.elastic_spacing_voxels)
    enabled = chance(generator, batch, config.p_elastic, device)
    magnitude = uniform(generator, (batch,), *config.elastic_magnitude_voxels, device)
    noise = smooth_control(normal(generator, (batch, ndim, *grid), device))
    peak = noise.flatten(1).abs().amax(1).clamp_min(1e-12)
    scale = torch.where(enabled, magnitude, torch.zeros_like(magnitude)) / peak
    return noise * scale.reshape(batch, *([1] * (ndim + 1)))


def random_spatial_transform(
    batch: int,
    crop_size: Sequence[int],
    patch_size: Sequence[int],
    config: AugmentConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    mirror_axis: int | None = None,
    spacing_mm: Sequence[float] | None = None,
) -> SpatialTransform:
    """A random transform per sample, as configured; ``mirror_axis=None`` never mirrors.

    With ``spacing_mm`` (the voxel size along each array axis), rotation and shear act in
    physical space, so anisotropic voxels are rotated rigidly.
    """
    device = torch.device(device)
    ndim = len(patch_size)
    if len(crop_size) != ndim:
        raise ValueError(
            f"crop {tuple(crop_size)} and patch {tuple(patch_size)} differ in dimension"
        )
    if mirror_axis is not None and not -ndim <= mirror_axis < ndim:
        raise ValueError(f"mirror_axis {mirror_axis} is not an axis of a {ndim}D patch")
    draw = _Draws(
        generator, batch, ndim, device
    )  # the draws below keep their order: seeds reproduce
    rotation, shear = _random_rotation_and_shear(draw, config, spacing_mm)
    zoom = _random_zoom(draw, config)
    mirror, flip = _random_mirror(draw, config, mirror_axis)
    matrix = rotation @ shear @ torch.diag_embed(flip / zoom)
    shift_on = chance(generator, batch, config.p_translation, device)
    limit = config.translation_voxels
    shift = uniform(generator, (batch, ndim), -limit, limit, device) * shift_on[:, None]
    centre_in = torch.tensor(crop_centre(crop_size, patch_size), device=device)
    centre_out = torch.tensor([(p - 1) / 2 for p in patch_size], device=device)
    offset = centre_in + shift - torch.matmul(matrix, centre_out)
    control = random_elastic_control(batch, patch_size, config, generator, device)
    return SpatialTransform(
        matrix=matrix,
        offset=offset,
        control=control,
        mirrored=mirror,
        patch_size=tuple(int(p) for p in patch_size),
        crop_size=tuple(int(s) for s in crop_size),
    )


@dataclass
class _Draws:
    """Where a batch's random draws come from: the generator, the batch size, the dimensions."""

    generator: torch.Generator | None
    batch: int
    ndim: int
    device: torch.device

    def chance(self, probability: float) -> Tensor:
        return chance(self.generator, self.batch, probability, self.device)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> Tensor:
        return uniform(self.generator, (self.batch, *shape), low, high, self.device)


def _random_rotation_and_shear(
    draw: _Draws, config: AugmentConfig, spacing_mm: Sequence[float] | None
) -> tuple[Tensor, Tensor]:
    """Rotation and shear matrices ``(B, D, D)`` in voxel units; rigid in mm with ``spacing_mm``."""
    batch, ndim, device = draw.batch, draw.ndim, draw.device
    limits = (config.rotation_2d_deg,) if ndim == 2 else config.rotation_3d_deg
    limit = torch.tensor([math.radians(a) for a in limits], device=device)
    rotate = draw.chance(config.p_rotation)
    angles = (2 * _draw(draw.generator, (batch, len(limits)), device) - 1) * limit
    rotation = rotation_matrices(angles * rotate[:, None])
    shear_on = draw.chance(config.p_shear)
    shear_values = draw.uniform((ndim, ndim), -config.shear, config.shear)
    eye = torch.eye(ndim, device=device)
    shear = eye + shear_values * (1 - eye) * shear_on[:, None, None]
    if spacing_mm is not None:
        voxel = torch.tensor([float(s) for s in spacing_mm], device=device)
        conjugate = voxel[None, :] / voxel[:, None]  # diag(1/v) M diag(v), exact on the diagonal
        rotation, shear = rotation * conjugate, shear * conjugate
    return rotation, shear


def _random_zoom(draw: _Draws, config: AugmentConfig) -> Tensor:
    """Zoom factors ``(B, D)``: isotropic, then per axis."""
    zoom = torch.ones(draw.batch, draw.ndim, device=draw.device)
    zoom_on = draw.chance(config.p_scale)
    zoom_iso = draw.uniform((), *config.scale)
    zoom = torch.where(zoom_on[:, None], zoom * zoom_iso[:, None], zoom)
    axis_on = draw.chance(config.p_axis_scale)
    axis_zoom = draw.uniform((draw.ndim,), *config.axis_scale)
    return torch.where(axis_on[:, None], zoom * axis_zoom, zoom)


def _random_mirror(
    draw: _Draws, config: AugmentConfig, mirror_axis: int | None
) -> tuple[Tensor, Tensor]:
    """Which samples are mirrored ``(B,)`` and the sign per axis ``(B, D)``."""
    mirror = torch.zeros(draw.batch, dtype=torch.bool, device=draw.device)
    flip = torch.ones(draw.batch, draw.ndim, device=draw.device)
    mirror_draw = draw.chance(config.p_mirror)
    if mirror_axis is not None:
        mirror = mirror_draw
        flip[:, mirror_axis % draw.ndim] = torch.where(mirror, -1.0, 1.0)
    return mirror, flip


def swap_pairs(points: Tensor, pairs: Sequence[tuple[int, int]], mirrored: Tensor) -> Tensor:
    """Points ``(B, K, D)`` with the rows of each pair swapped in the mirrored samples."""
    if not pairs:
        return points
    order = torch.tensor(pair_permutation(points.shape[1], pairs), device=points.device)
    return torch.where(mirrored[:, None, None], points[:, order], points)
