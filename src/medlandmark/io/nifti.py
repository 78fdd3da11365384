"""What a NIfTI header says about where its voxels lie, read without ITK: its qform and sform.

A NIfTI file may carry two index-to-world transforms. Readers choose one (ITK prefers a valid
sform), so when the two disagree the file's position depends on the reader: that is worth a
warning, never a silent choice.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlandmark.io.files import full_suffix

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class NiftiTransforms:
    """A NIfTI header's spatial size and its index-to-world transforms (4 x 4, LPS mm; None
    when its code is 0, i.e. not set)."""

    shape: tuple[int, int, int]
    qform: np.ndarray | None
    sform: np.ndarray | None


def read_nifti_transforms(path: str | Path) -> NiftiTransforms | None:
    """The qform and sform of a NIfTI-1 or NIfTI-2 file (None when the header is unreadable)."""
    path = Path(path)
    opener = gzip.open if full_suffix(path) == ".nii.gz" else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for order in "<>":
        size = struct.unpack(f"{order}i", header[:4])[0] if len(header) >= 4 else 0
        if size == 348 and len(header) >= 348:
            return _nifti1(header, order)
        if size == 540 and len(header) >= 540:
            return _nifti2(header, order)
    return None


def _nifti1(header: bytes, order: str) -> NiftiTransforms:
    dims = struct.unpack(f"{order}8h", header[40:56])
    pixdim = struct.unpack(f"{order}8f", header[76:108])
    qform_code, sform_code = struct.unpack(f"{order}2h", header[252:256])
    quatern = struct.unpack(f"{order}6f", header[256:280])
    srows = struct.unpack(f"{order}12f", header[280:328])
    return _transforms(dims, pixdim, qform_code, sform_code, quatern, srows)


def _nifti2(header: bytes, order: str) -> NiftiTransforms:
    dims = struct.unpack(f"{order}8q", header[16:80])
    pixdim = struct.unpack(f"{order}8d", header[104:168])
    qform_code, sform_code = struct.unpack(f"{order}2i", header[344:352])
    quatern = struct.unpack(f"{order}6d", header[352:400])
    srows = struct.unpack(f"{order}12d", header[400:496])
    return _transforms(dims, pixdim, qform_code, sform_code, quatern, srows)


def _transforms(dims, pixdim, qform_code, sform_code, quatern, srows) -> NiftiTransforms:
    shape = tuple(max(int(dims[a]), 1) if a <= dims[0] else 1 for a in (1, 2, 3))
    qform = _qform(pixdim, quatern) if qform_code > 0 else None
    sform = None
    if sform_code > 0:
        sform = np.eye(4)
        sform[:3, :] = np.asarray(srows, dtype=np.float64).reshape(3, 4)
        sform = RAS_TO_LPS @ sform
    return NiftiTransforms(shape, qform, sform)


def _qform(pixdim, quatern) -> np.ndarray:
    """The qform: rotation from the quaternion (b, c, d), scaled by pixdim (qfac flips z)."""
    b, c, d, *offset = (float(v) for v in quatern)
    a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    scale = np.array([abs(pixdim[1]) or 1.0, abs(pixdim[2]) or 1.0, (abs(pixdim[3]) or 1.0) * qfac])
    transform = np.eye(4)
    transform[:3, :3] = rotation * scale
    transform[:3, 3] = offset
    return RAS_TO_LPS @ transform


def transforms_disagreement_mm(transforms: NiftiTransforms) -> float:
    """How far apart (mm) the qform and the sform place the image's corner voxels; 0 when the
    file does not set both."""
    if transforms.qform is None or transforms.sform is None:
        return 0.0
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, transforms.shape[0] - 1)
            for j in (0, transforms.shape[1] - 1)
            for k in (0, transforms.shape[2] - 1)
        ]
    )
    apart = (corners @ transforms.qform.T - corners @ transforms.sform.T)[:, :3]
    return float(np.linalg.norm(apart, axis=1).max())
