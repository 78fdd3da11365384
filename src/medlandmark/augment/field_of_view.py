"""Field-of-view cuts: part of a patch is blanked as if the scan had stopped there.

A scanned volume often ends inside the anatomy, and the landmarks beyond its edge are then
missing. :func:`random_field_of_view_cut` imitates that on a batch ``(B, C, *spatial)``: for a
sample, a plane across one array axis, placed among that sample's landmarks, splits the patch;
the voxels on one side become ``fill`` (0, the normalised mean, which is also what prediction
pads an image with) and the landmarks on that side become missing (NaN). Nothing moves.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medlandmark.augment.spatial import chance, uniform


def random_field_of_view_cut(
    images: Tensor,
    points: Tensor,
    p: float,
    generator: torch.Generator | None = None,
    fill: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Cut each sample with probability ``p``: a random array axis, side, and position between the
    lowest and highest present landmark along that axis; returns new images and points.

    ``points`` ``(B, K, D)`` are patch voxel indices (NaN rows missing). The kept voxels end at a
    voxel boundary, and a landmark is cut off when it lies beyond that boundary (more than half a
    voxel past the last kept voxel's centre), exactly as :meth:`Geometry.contains_world` judges
    a real field of view. A sample without a present landmark is left as it is.
    """
    batch, ndim = images.shape[0], images.dim() - 2
    if p <= 0 or batch == 0:
        return images, points
    device = images.device
    chosen = chance(generator, batch, p, device)
    axes = (uniform(generator, (batch,), 0.0, float(ndim), device).floor().long()).clamp_max(
        ndim - 1
    )
    keep_low = chance(generator, batch, 0.5, device)
    fraction = uniform(generator, (batch,), 0.0, 1.0, device)
    if not bool(chosen.any()):
        return images, points
    images, points = images.clone(), points.clone()
    finite = torch.isfinite(points).all(dim=-1)
    for b in torch.nonzero(chosen).flatten().tolist():
        if not bool(finite[b].any()):
            continue
        axis = int(axes[b])
        along = points[b, :, axis]
        low, high = float(along[finite[b]].min()), float(along[finite[b]].max())
        cut = low + float(fraction[b]) * (high - low)
        size = images.shape[2 + axis]
        if bool(keep_low[b]):
            edge = min(max(math.floor(cut + 0.5) + 1, 1), size)  # voxels [0, edge) stay
            images[b].narrow(1 + axis, edge, size - edge).fill_(fill)
            gone = along > edge - 0.5
        else:
            edge = max(min(math.ceil(cut - 0.5), size - 1), 0)  # voxels [edge, size) stay
            images[b].narrow(1 + axis, 0, edge).fill_(fill)
            gone = along < edge - 0.5
        points[b, gone] = math.nan
    return images, points
