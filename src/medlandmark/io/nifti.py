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
QUATERNION_HALF_TURN = 1e-7  # a^2 below this: a half turn (nifti1_io's quatern_to_mat44)


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that medlandmark reads itself (``dims`` and
    ``pixdim`` as the 8 values of the standard; ``quatern`` = quatern_b, c, d and qoffset_x,
    y, z; ``srows`` = srow_x, srow_y, srow_z, 4 values each)."""

    byte_order: str  # "<" or ">"
    dims: tuple[int, ...]
    datatype: int
    bitpix: int
    pixdim: tuple[float, ...]
    vox_offset: int
    qform_code: int
    sform_code: int
    quatern: tuple[float, ...]
    srows: tuple[float, ...]

    @property
    def data_end(self) -> int | None:
        """Byte offset where the voxel data ends (None: the dimensions make no sense)."""
        if not 1 <= self.dims[0] <= 7 or self.bitpix <= 0:
            return None
        sizes = [max(int(d), 1) for d in self.dims[1 : self.dims[0] + 1]]
        voxels = int(np.prod(sizes, dtype=np.int64))
        return self.vox_offset + (voxels * self.bitpix + 7) // 8


# per version: header size, then (struct format, offset) of each NiftiHeader field
_LAYOUTS = {
    1: (
        348,
        {
            "dims": ("8h", 40),
            "datatype": ("h", 70),
            "bitpix": ("h", 72),
            "pixdim": ("8f", 76),
            "vox_offset": ("f", 108),
            "qform_code": ("h", 252),
            "sform_code": ("h", 254),
            "quatern": ("6f", 256),
            "srows": ("12f", 280),
        },
    ),
    2: (
        540,
        {
            "dims": ("8q", 16),
            "datatype": ("h", 12),
            "bitpix": ("h", 14),
            "pixdim": ("8d", 104),
            "vox_offset": ("q", 168),
            "qform_code": ("i", 344),
            "sform_code": ("i", 348),
            "quatern": ("6d", 352),
            "srows": ("12d", 400),
        },
    ),
}


def parse_nifti_header(header: bytes) -> NiftiHeader | None:
    """The header in a NIfTI file's first 540 bytes (None when it is neither version)."""
    for order in "<>":
        size = struct.unpack(f"{order}i", header[:4])[0] if len(header) >= 4 else 0
        for layout_size, fields in _LAYOUTS.values():
            if size == layout_size and len(header) >= layout_size:
                values = {
                    name: struct.unpack_from(f"{order}{form}", header, offset)
                    for name, (form, offset) in fields.items()
                }
                scalars = {k: v[0] for k, v in values.items() if len(v) == 1}
                return NiftiHeader(
                    byte_order=order,
                    dims=values["dims"],
                    datatype=scalars["datatype"],
                    bitpix=scalars["bitpix"],
                    pixdim=values["pixdim"],
                    vox_offset=int(scalars["vox_offset"]),
                    qform_code=scalars["qform_code"],
                    sform_code=scalars["sform_code"],
                    quatern=values["quatern"],
                    srows=values["srows"],
                )
    return None


def read_nifti_header(path: str | Path) -> NiftiHeader | None:
    """The header of a .nii or .nii.gz file (None when it cannot be read or parsed)."""
    path = Path(path)
    opener = gzip.open if full_suffix(path) == ".nii.gz" else open
    try:
        with opener(path, "rb") as handle:
            return parse_nifti_header(handle.read(540))
    except (OSError, EOFError, zlib.error):
        return None


@dataclass(frozen=True)
class NiftiTransforms:
    """A NIfTI header's spatial size and its index-to-world transforms (4 x 4, LPS mm; None
    when its code is 0, i.e. not set)."""

    shape: tuple[int, int, int]
    qform: np.ndarray | None
    sform: np.ndarray | None


def read_nifti_transforms(path: str | Path) -> NiftiTransforms | None:
    """The qform and sform of a NIfTI-1 or NIfTI-2 file (None when the header is unreadable)."""
    header = read_nifti_header(path)
    return None if header is None else nifti_transforms(header)


def nifti_transforms(header: NiftiHeader) -> NiftiTransforms:
    """The spatial size and the transforms that ``header`` sets."""
    dims = header.dims
    shape = tuple(max(int(dims[a]), 1) if a <= dims[0] else 1 for a in (1, 2, 3))
    qform = _qform(header.pixdim, header.quatern) if header.qform_code > 0 else None
    sform = None
    if header.sform_code > 0:
        sform = np.eye(4)
        sform[:3, :] = np.asarray(header.srows, dtype=np.float64).reshape(3, 4)
        sform = RAS_TO_LPS @ sform
    return NiftiTransforms(shape, qform, sform)


def _qform(pixdim, quatern) -> np.ndarray:
    """The qform: rotation from the quaternion (b, c, d), scaled by pixdim (qfac flips z).

    As nifti1_io (which ITK uses) reads it: when a^2 = 1 - (b^2 + c^2 + d^2) is below 1e-7 the
    rotation is a half turn (a = 0, (b, c, d) renormalised); a half turn stored in float32
    otherwise reads as a turn off by 0.015 degrees."""
    b, c, d, *offset = (float(v) for v in quatern)
    squared = b * b + c * c + d * d
    if 1.0 - squared < QUATERNION_HALF_TURN:
        norm = math.sqrt(squared)
        a, b, c, d = 0.0, b / norm, c / norm, d / norm
    else:
        a = math.sqrt(1.0 - squared)
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
