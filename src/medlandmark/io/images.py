"""Read and write images with their geometry through SimpleITK.

Every image comes back as :class:`ImageData`: a channels-first array ``(C, *spatial)`` in array
axis order and the :class:`~medlandmark.io.geometry.Geometry` that places it in the world.
RGB(A) radiographs become one grey channel; a 3D image with a single slice is a 2D image.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medlandmark.console import warn
from medlandmark.errors import ImageError
from medlandmark.io.files import atomic_directory_write, atomic_path, full_suffix
from medlandmark.io.geometry import Geometry, index_to_world
from medlandmark.io.nifti import (
    NiftiHeader,
    nifti_transforms,
    parse_nifti_header,
    read_nifti_header,
    transforms_disagreement_mm,
)
from medlandmark.io.signatures import refuse_wrong_signature

# Formats whose files carry no trustworthy physical spacing: it comes from dataset.json or the CLI.
FORMATS_WITHOUT_SPACING = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_SUFFIXES = (
    ".nii",
    ".nii.gz",
    ".nrrd",
    ".mha",
    ".mhd",
    ".dcm",
    *FORMATS_WITHOUT_SPACING,
)
MAX_VOXELS = int(os.environ.get("MEDLANDMARK_MAX_VOXELS", 1_500_000_000))
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MIN_SIZE = 2  # voxels along every axis: a single row or column holds no landmark's neighbourhood
TRANSFORMS_APART_MM = 0.1  # a NIfTI's qform and sform further apart than this: warned
_warned_transforms: set[Path] = set()

sitk.ProcessObject.SetGlobalWarningDisplay(False)


@dataclass
class ImageData:
    """Voxels ``(C, *spatial)`` in array axis order, and where they lie in the world."""

    array: np.ndarray
    geometry: Geometry

    @property
    def channels(self) -> int:
        return self.array.shape[0]

    @property
    def ndim(self) -> int:
        return self.geometry.ndim


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, read without loading the voxels."""

    geometry: Geometry
    channels: int
    pixel_type: str
    spacing_from_file: bool


def is_image_path(path: str | Path) -> bool:
    """True for a file with a supported image suffix, or a folder (a DICOM series)."""
    path = Path(path)
    return path.is_dir() or full_suffix(path) in IMAGE_SUFFIXES


def read_image_info(
    path: str | Path,
    spacing_xy_mm: Sequence[float] | None = None,
    allow_missing_spacing: bool = False,
) -> ImageInfo:
    """Geometry, channel count and pixel type from the header alone (no voxels are read)."""
    path = Path(path)
    if path.is_dir():
        return _info_from_image(
            path, _read_dicom_series(path), spacing_xy_mm, allow_missing_spacing
        )
    reader = _file_reader(path)
    if full_suffix(path) in FORMATS_WITHOUT_SPACING:
        check_image_complete(path)  # before ITK, whose PNG reader prints libpng's complaints
    if full_suffix(path) in (".mha", ".mhd"):
        _refuse_incomplete_metaimage_header(path)  # ITK's MetaImage reader prints to stderr
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ImageError(f"not a readable image ({_itk_reason(error)})", path) from None
    size = reader.GetSize()
    _refuse_too_large(path, size, reader.GetNumberOfComponents())
    _refuse_too_small(path, size)
    nifti = read_nifti_header(path) if full_suffix(path) in NIFTI_SUFFIXES else None
    _refuse_bad_nifti_spacing(path, nifti)
    geometry, from_file = _geometry(
        path,
        size,
        reader.GetSpacing(),
        reader.GetOrigin(),
        reader.GetDirection(),
        spacing_xy_mm,
        allow_missing_spacing,
    )
    _warn_if_nifti_transforms_disagree(path, geometry, nifti)
    channels = _channels_after_conversion(reader.GetNumberOfComponents())
    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    return ImageInfo(geometry, channels, pixel_type, from_file)


def _refuse_too_small(path: Path, size: Sequence[int]) -> None:
    """An image with fewer than MIN_SIZE voxels along an axis (a single slice of a 3D file is a
    2D image, not a thin volume)."""
    axes = [int(n) for n in size]
    if len(axes) == 3 and axes[2] == 1:
        axes = axes[:2]
    if len(axes) in (2, 3) and min(axes) < MIN_SIZE:
        raise ImageError(
            f"image is {' x '.join(str(n) for n in axes)} voxels: too small to hold landmarks "
            f"(at least {MIN_SIZE} along every axis)",
            path,
        )


def _warn_if_nifti_transforms_disagree(
    path: Path, geometry: Geometry, header: NiftiHeader | None
) -> None:
    """Warn (once per file) when a NIfTI's qform and sform (its ``header``; None for another
    format) place it differently, saying which one ITK used: a reader that takes the other sees
    the landmarks elsewhere."""
    if header is None or path in _warned_transforms:
        return
    transforms = nifti_transforms(header)
    apart = transforms_disagreement_mm(transforms)
    if apart <= TRANSFORMS_APART_MM:
        return
    _warned_transforms.add(path)
    last = np.zeros(3)  # the far corner voxel, in ITK (x, y, z) order
    last[: geometry.ndim] = np.asarray(geometry.shape[::-1], dtype=np.float64) - 1
    corner = np.array([*last, 1.0])
    world = index_to_world(last[: geometry.ndim][::-1], geometry)
    distances = {
        name: float(np.linalg.norm((matrix @ corner)[: len(world)] - world))
        for name, matrix in (("qform", transforms.qform), ("sform", transforms.sform))
    }
    used = min(distances, key=distances.get)
    warn(
        f"{path}: its NIfTI qform and sform disagree (they place the image up to {apart:.1f} mm "
        f"apart); the {used} was used, as ITK chooses. If landmarks do not line up with this "
        "image, fix its header (set the wrong transform's code to 0)"
    )


def read_image(
    path: str | Path,
    spacing_xy_mm: Sequence[float] | None = None,
    allow_missing_spacing: bool = False,
    require_finite: bool = True,
) -> ImageData:
    """Read an image file or a DICOM series folder as ``(C, *spatial)`` voxels plus geometry.

    ``spacing_xy_mm`` (x then y, as headers list it) is used for PNG/JPEG/BMP/TIFF, which carry
    no trustworthy spacing; without it such a file is an error unless ``allow_missing_spacing``
    (1 mm pixels). NaN or infinite voxels are an error when ``require_finite``.
    """
    path = Path(path)
    if path.is_dir():
        image = _read_dicom_series(path)
        geometry = _info_from_image(path, image, spacing_xy_mm, allow_missing_spacing).geometry
    else:
        # the header's geometry, checked (and the size refused if absurd) before allocating
        geometry = read_image_info(path, spacing_xy_mm, allow_missing_spacing).geometry
        check_image_complete(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise ImageError(
                f"image data cannot be read, the file may be truncated or corrupt "
                f"({_itk_reason(error)})",
                path,
            ) from None
    array = _channels_first(sitk.GetArrayFromImage(image), image.GetNumberOfComponentsPerPixel())
    array = array.reshape((array.shape[0], *geometry.shape))
    if require_finite and np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if full_suffix(path) in NIFTI_SUFFIXES:
            bad = max(bad, _count_nonfinite_nifti_voxels(path))
        if bad:
            raise ImageError(f"{bad} voxels are NaN or infinite", path)
    return ImageData(array, geometry)


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry) -> None:
    """Write ``(C, *spatial)`` or ``spatial`` voxels with their geometry, atomically.

    The format follows the suffix; 2D formats without spacing (PNG...) lose the geometry.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.ndim == geometry.ndim:
        array = array[None]
    if array.shape[1:] != geometry.shape:
        raise ImageError(
            f"array shape {array.shape} does not match geometry {geometry.shape}", path
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    channels = array.shape[0]
    voxels = np.moveaxis(array, 0, -1) if channels > 1 else array[0]
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels), isVector=channels > 1)
    spacing, origin, direction = geometry.to_itk()
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    writer = atomic_directory_write if full_suffix(path) == ".mhd" else atomic_path
    with writer(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=full_suffix(path) in (".nrrd", ".mha"))
        except RuntimeError as error:
            raise ImageError(f"cannot write image ({_itk_reason(error)})", path) from None


def _file_reader(path: Path) -> sitk.ImageFileReader:
    if path.is_symlink() and not path.exists():
        raise ImageError("is a symbolic link that leads nowhere (a broken link, or a loop)", path)
    if not path.exists():
        raise ImageError("image file does not exist", path)
    if path.stat().st_size == 0:
        raise ImageError("image file is empty (0 bytes)", path)
    refuse_wrong_signature(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    return reader


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ImageError("folder holds no DICOM series", folder)
    if len(series_ids) > 1:
        raise ImageError(
            f"folder holds {len(series_ids)} DICOM series ({', '.join(series_ids)}); "
            "put each series in a folder of its own",
            folder,
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise ImageError(f"DICOM series cannot be read ({_itk_reason(error)})", folder) from None


def _info_from_image(
    path: Path, image: sitk.Image, spacing_xy_mm: Sequence[float] | None, allow_missing: bool
) -> ImageInfo:
    geometry, from_file = _geometry(
        path,
        image.GetSize(),
        image.GetSpacing(),
        image.GetOrigin(),
        image.GetDirection(),
        spacing_xy_mm,
        allow_missing,
    )
    channels = _channels_after_conversion(image.GetNumberOfComponentsPerPixel())
    return ImageInfo(geometry, channels, image.GetPixelIDTypeAsString(), from_file)


def _geometry(
    path: Path,
    size: Sequence[int],
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    spacing_xy_mm: Sequence[float] | None,
    allow_missing_spacing: bool,
) -> tuple[Geometry, bool]:
    """Geometry of the image as we hold it (2D when it has a single slice) and whether the
    spacing came from the file."""
    ndim = len(size)
    if ndim not in (2, 3):
        raise ImageError(f"image has {ndim} dimensions; only 2D and 3D images are supported", path)
    direction = np.asarray(direction, dtype=np.float64).reshape(ndim, ndim)
    if ndim == 3 and size[2] == 1:
        size, spacing, origin = size[:2], spacing[:2], origin[:2]
        direction = direction[:2, :2]
        ndim = 2
    from_file = full_suffix(path) not in FORMATS_WITHOUT_SPACING
    if not from_file:
        if spacing_xy_mm is not None:
            spacing = tuple(float(s) for s in spacing_xy_mm)
            if len(spacing) == 1:
                spacing = spacing * ndim
            if len(spacing) != ndim:
                raise ImageError(f"spacing {spacing_xy_mm} given for a {ndim}D image", path)
        elif not allow_missing_spacing:
            raise ImageError(
                f"{full_suffix(path)} files store no pixel spacing: give it as 'spacing_mm' in "
                "dataset.json or with --spacing MM",
                path,
            )
        else:
            spacing = (1.0,) * ndim
        origin, direction = (0.0,) * ndim, np.eye(ndim)
    geometry = Geometry.from_itk(spacing, origin, direction.ravel(), size)
    return geometry.validated(path), from_file


def _channels_after_conversion(components: int) -> int:
    return 1 if components in (3, 4) else components


def _channels_first(voxels: np.ndarray, components: int) -> np.ndarray:
    """``(*spatial[, comp])`` -> ``(C, *spatial)``; RGB(A) becomes one grey channel."""
    if components == 1:
        return voxels[None]
    channels = np.moveaxis(voxels, -1, 0)
    if components in (3, 4):
        rgb = channels[:3]
        if np.array_equal(rgb[0], rgb[1]) and np.array_equal(rgb[0], rgb[2]):
            return rgb[:1]
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.tensordot(weights, rgb.astype(np.float32), axes=1)[None]
    return channels


def _refuse_too_large(path: Path, size: Sequence[int], components: int) -> None:
    voxels = int(np.prod(size, dtype=np.int64)) * max(components, 1)
    if voxels > MAX_VOXELS:
        raise ImageError(
            f"image header declares {' x '.join(map(str, size))} pixels ({voxels:,} values), "
            f"more than the limit of {MAX_VOXELS:,}; refusing to allocate it "
            "(raise MEDLANDMARK_MAX_VOXELS if it is genuine)",
            path,
        )


def check_image_complete(path: str | Path) -> None:
    """Refuse a truncated JPEG/PNG/BMP/NIfTI/MetaImage file, cheaply (no decoding): SimpleITK
    decodes the first ones silently (filling in grey or 0) and only prints a warning for the
    last; raises :class:`ImageError`."""
    path = Path(path)
    suffix = full_suffix(path)
    if suffix in NIFTI_SUFFIXES and _nifti_truncated(path):
        raise ImageError("image file is truncated (less voxel data than its header declares)", path)
    if suffix in (".mha", ".mhd"):
        _check_metaimage_data(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(32)
        handle.seek(max(0, size - 16))
        tail = handle.read()
    truncated = (
        (suffix in (".jpg", ".jpeg") and b"\xff\xd9" not in tail)
        or (suffix == ".png" and b"IEND" not in tail)
        or (suffix == ".bmp" and len(head) >= 6 and int.from_bytes(head[2:6], "little") > size)
    )
    if truncated:
        raise ImageError("image file is truncated (its end marker is missing)", path)


def _nifti_truncated(path: Path) -> bool:
    """True when a NIfTI file ends before the voxel data its header declares. A .nii.gz whose
    gzip trailer records the expected size is trusted; otherwise it is decompressed to count."""
    compressed = full_suffix(path) == ".nii.gz"
    try:
        with (gzip.open if compressed else open)(path, "rb") as handle:
            header = parse_nifti_header(handle.read(540))
        end = None if header is None else header.data_end
        if end is None:
            return False
        if not compressed:
            return path.stat().st_size < end
        with path.open("rb") as handle:
            handle.seek(-4, os.SEEK_END)
            if int.from_bytes(handle.read(4), "little") == end % (1 << 32):
                return False
        with gzip.open(path, "rb") as handle:
            length = sum(len(chunk) for chunk in iter(lambda: handle.read(1 << 24), b""))
        return length < end
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return True


def _refuse_bad_nifti_spacing(path: Path, header: NiftiHeader | None) -> None:
    """ITK reads a NIfTI pixdim of 0 or NaN as 1 mm: a wrong geometry, silently. ``header``:
    the file's NIfTI header (None for another format, or one ITK alone could read: whatever is
    wrong then shows when the voxels are read)."""
    if header is None:
        return
    dims, pixdim = header.dims, header.pixdim
    axes = [a for a in range(1, min(max(int(dims[0]), 0), 3) + 1) if dims[a] > 1]
    bad = [pixdim[a] for a in axes if not (np.isfinite(pixdim[a]) and pixdim[a] > 0)]
    if bad:
        spacing = " x ".join(f"{pixdim[a]:g}" for a in axes)
        raise ImageError(
            f"header spacing (NIfTI pixdim) is {spacing} mm; voxel spacing must be positive and "
            "finite",
            path,
        )


_METAIMAGE_TYPE_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _metaimage_header(path: Path) -> tuple[dict[str, str], int | None]:
    """A MetaImage's ``key = value`` header lines up to its last, ElementDataFile, and the
    header's length in bytes (None when that line is not in the first 64 KiB)."""
    with path.open("rb") as handle:
        head = handle.read(1 << 16)
    fields: dict[str, str] = {}
    offset = 0
    for line in head.splitlines(keepends=True):
        offset += len(line)
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, offset
    return fields, None


def _check_metaimage_data(path: Path) -> None:
    """An uncompressed MetaImage (.mha/.mhd) must hold the bytes its header declares."""
    fields, header_bytes = _metaimage_header(path)
    data_file = fields.get("ElementDataFile", "")
    _refuse_data_file_outside(path, data_file)
    if header_bytes is None or fields.get("CompressedData", "False").lower() == "true":
        return
    if fields.get("BinaryData", "True").lower() == "false":  # voxels written as text
        return
    if "HeaderSize" in fields or data_file.upper() == "LIST" or "%" in data_file:
        return
    try:
        sizes = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        value_bytes = _METAIMAGE_TYPE_BYTES[fields.get("ElementType", "")]
    except (ValueError, KeyError):
        return  # an unusual header: left to ITK
    expected = int(np.prod(sizes, dtype=np.int64)) * channels * value_bytes
    if data_file.upper() == "LOCAL":
        actual = path.stat().st_size - header_bytes
    else:
        data_path = path.parent / data_file
        if not data_path.is_file():
            raise ImageError(f"its voxel data file '{data_file}' does not exist", path)
        actual = data_path.stat().st_size
    if actual < expected:
        where = "image file" if data_file.upper() == "LOCAL" else f"voxel data file '{data_file}'"
        raise ImageError(
            f"{where} is truncated ({actual:,} bytes of voxel data, its header declares "
            f"{expected:,})",
            path,
        )


METAIMAGE_REQUIRED = ("NDims", "DimSize", "ElementType", "ElementDataFile")


def _refuse_incomplete_metaimage_header(path: Path) -> None:
    """A MetaImage header must name its dimensions, type and data (the last line); a file cut
    inside its header is refused here, before ITK prints its own complaint."""
    fields, _ = _metaimage_header(path)
    absent = [key for key in METAIMAGE_REQUIRED if key not in fields]
    if absent:
        raise ImageError(
            f"MetaImage header is incomplete (no {', '.join(absent)} line): the file may be cut "
            "inside its header",
            path,
        )


def _refuse_data_file_outside(path: Path, data_file: str) -> None:
    """A MetaImage header may name any file as its voxel data; one outside the header's folder
    (an absolute path, or one that climbs out with "..") is refused, not read."""
    if data_file.upper() in ("LOCAL", "LIST", "") or "%" in data_file:
        return
    normal = os.path.normpath(data_file)
    if os.path.isabs(data_file) or normal == ".." or normal.startswith(".." + os.sep):
        raise ImageError(
            f"its voxel data file '{data_file}' lies outside the image's folder; a MetaImage "
            "header must name a data file beside it",
            path,
        )


_NIFTI_FLOAT_TYPES = {16: np.float32, 32: np.float32, 64: np.float64, 1792: np.float64}


def _count_nonfinite_nifti_voxels(path: Path) -> int:
    """Count NaN/inf voxels in the file itself: ITK's NIfTI reader (before ITK 6) silently
    turns them into 0, which would hide a corrupt image."""
    opener = gzip.open if full_suffix(path) == ".nii.gz" else open
    with opener(path, "rb") as handle:
        header = parse_nifti_header(handle.read(540))
        if header is None or header.datatype not in _NIFTI_FLOAT_TYPES:
            return 0
        dtype = np.dtype(_NIFTI_FLOAT_TYPES[header.datatype]).newbyteorder(header.byte_order)
        handle.seek(header.vox_offset)
        bad = 0
        chunk_bytes = dtype.itemsize * (1 << 22)
        while chunk := handle.read(chunk_bytes):
            values = np.frombuffer(chunk[: len(chunk) - len(chunk) % dtype.itemsize], dtype)
            bad += int(np.count_nonzero(~np.isfinite(values)))
    return bad


def _itk_reason(error: RuntimeError) -> str:
    """The useful sentence of a multi-line ITK exception."""
    text = str(error)
    if "No such file or directory" in text and "Reason:" in text:
        return "ITK could not read all of its data"  # a stale errno, not the file's absence
    for marker in ("Unable to determine ImageIO reader", "Reason:", "ITK ERROR:", "sitk::ERROR:"):
        if marker in text:
            reason = text.split(marker, 1)[1].strip().splitlines()[0].strip()
            if marker.startswith("Unable"):
                return "unknown format or wrong magic bytes"
            return reason
    return text.strip().splitlines()[-1] if text.strip() else "unknown error"
