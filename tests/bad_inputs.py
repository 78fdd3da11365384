"""A corpus of bad inputs, generated on demand (nothing binary is committed).

Each :class:`BadInput` writes one fault into a dataset folder that already holds clean cases
(:func:`clean_dataset`): a broken image, a broken landmark file, or a broken dataset.json /
splits.json / folder. ``offending`` is the file every error must name and ``needles`` what
it must say about it, whichever verb meets the fault first.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from medlandmark.datasets.dataset import DatasetSpec, write_spec
from medlandmark.datasets.synthetic import SYNTHETIC_LANDMARKS, synthetic_case
from medlandmark.io.geometry import Geometry, index_to_world
from medlandmark.io.images import write_image
from medlandmark.io.landmarks import LandmarkSet, write_landmarks

SIZE_PX = 32
SPACING_MM = 1.0
CLEAN_CASES = ("case000", "case001", "case002")
BAD_CASE = "bad"
GEOMETRY = Geometry.identity((SIZE_PX, SIZE_PX), (SPACING_MM, SPACING_MM))
NIFTI_PIXDIM_X = 80  # byte offset of pixdim[1] in a NIfTI-1 header
NIFTI_QFORM_CODE, NIFTI_SFORM_CODE, NIFTI_SROW = 252, 254, 280


@dataclass(frozen=True)
class BadInput:
    """One fault: what it breaks (``kind``), the file to blame, and what the error must say."""

    name: str
    kind: Literal["image", "landmarks", "dataset"]
    offending: str  # path relative to the dataset folder
    needles: tuple[str, ...]
    make: Callable[[Path], None]

    def build(self, root: Path) -> Path:
        """A clean dataset in ``root`` with this fault added; returns ``root``."""
        clean_dataset(root)
        self.make(root)
        return root


# --- the clean dataset the faults are added to ---------------------------------------------------


def spec(**changes) -> DatasetSpec:
    fields = {
        "name": "corpus",
        "spatial_dims": 2,
        "landmarks": SYNTHETIC_LANDMARKS,
        "modalities": ["xray"],
        "spacing_mm": [SPACING_MM, SPACING_MM],
    }
    return DatasetSpec(**{**fields, **changes})


def clean_pixels(seed: int = 0) -> tuple[np.ndarray, LandmarkSet]:
    """A small synthetic radiograph (uint8) and its landmarks in world mm."""
    image, landmarks_xy = synthetic_case(seed, SIZE_PX)
    points_mm = index_to_world(landmarks_xy[:, ::-1], GEOMETRY)
    return image, LandmarkSet(SYNTHETIC_LANDMARKS, points_mm)


def clean_dataset(root: Path) -> Path:
    """Three clean PNG + CSV cases, 1 mm pixels from dataset.json, no splits."""
    for seed, case_id in enumerate(CLEAN_CASES):
        image, landmarks = clean_pixels(seed)
        write_image(root / "images" / f"{case_id}.png", image, GEOMETRY)
        write_landmarks(root / "landmarks" / f"{case_id}.csv", landmarks)
    write_spec(root, spec())
    return root


def _good_landmarks(root: Path, suffix: str = ".csv") -> None:
    write_landmarks(root / "landmarks" / f"{BAD_CASE}{suffix}", clean_pixels(7)[1], GEOMETRY)


def _bad_image(root: Path, suffix: str) -> Path:
    """Where the bad case's image goes; the case gets good landmarks."""
    _good_landmarks(root)
    path = root / "images" / f"{BAD_CASE}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _good_image(root: Path) -> None:
    write_image(root / "images" / f"{BAD_CASE}.png", clean_pixels(7)[0], GEOMETRY)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- images -------------------------------------------------------------------------------------


def truncated_png(root: Path) -> None:
    path = _bad_image(root, ".png")
    write_image(path, clean_pixels(7)[0], GEOMETRY)
    _truncate(path)


def truncated_jpeg(root: Path) -> None:
    path = _bad_image(root, ".jpg")
    sitk.WriteImage(sitk.GetImageFromArray(clean_pixels(7)[0]), str(path))
    _truncate(path)


def truncated_nifti_gz(root: Path) -> None:
    path = _bad_image(root, ".nii.gz")
    write_image(path, clean_pixels(7)[0].astype(np.float32), GEOMETRY)
    _truncate(path)


def truncated_nifti(root: Path) -> None:
    path = _bad_image(root, ".nii")
    write_image(path, clean_pixels(7)[0].astype(np.float32), GEOMETRY)
    _truncate(path, 0.8)


def truncated_mha(root: Path) -> None:
    """Uncompressed MetaImage cut short: ITK itself would only print a warning on stderr."""
    path = _bad_image(root, ".mha")
    sitk.WriteImage(sitk.GetImageFromArray(clean_pixels(7)[0]), str(path), False)
    _truncate(path, 0.8)


def truncated_mhd_raw(root: Path) -> None:
    """MetaImage header (.mhd) whose separate voxel file (.raw) is cut short."""
    path = _bad_image(root, ".mhd")
    sitk.WriteImage(sitk.GetImageFromArray(clean_pixels(7)[0]), str(path), False)
    _truncate(path.with_suffix(".raw"), 0.8)


def zero_byte_image(root: Path) -> None:
    _bad_image(root, ".png").write_bytes(b"")


def wrong_magic_bytes(root: Path) -> None:
    _bad_image(root, ".png").write_text("this is a text file, not a PNG image\n" * 20)


def _float_nifti(root: Path, value: float) -> None:
    pixels = clean_pixels(7)[0].astype(np.float32)
    pixels[5, 6] = value
    write_image(_bad_image(root, ".nii.gz"), pixels, GEOMETRY)


def nan_voxels(root: Path) -> None:
    _float_nifti(root, np.nan)


def inf_voxels(root: Path) -> None:
    _float_nifti(root, np.inf)


def image_4d(root: Path) -> None:
    sitk.WriteImage(
        sitk.Image([SIZE_PX, SIZE_PX, 2, 2], sitk.sitkUInt8), str(_bad_image(root, ".nii.gz"))
    )


def two_channels(root: Path) -> None:
    pixels = clean_pixels(7)[0]
    write_image(_bad_image(root, ".nii.gz"), np.stack([pixels, pixels]), GEOMETRY)


def image_3d_in_2d_dataset(root: Path) -> None:
    pixels = np.stack([clean_pixels(7)[0]] * 3)
    write_image(_bad_image(root, ".nii.gz"), pixels, Geometry.identity(pixels.shape))


def _patched_nifti(root: Path, patch: Callable[[bytearray], None]) -> None:
    path = _bad_image(root, ".nii")
    write_image(path, clean_pixels(7)[0].astype(np.float32), GEOMETRY)
    header = bytearray(path.read_bytes())
    patch(header)
    path.write_bytes(bytes(header))


def _pixdim_x(value: float) -> Callable[[bytearray], None]:
    return lambda header: struct.pack_into("<f", header, NIFTI_PIXDIM_X, value)


def zero_spacing_nifti(root: Path) -> None:
    _patched_nifti(root, _pixdim_x(0.0))


def negative_spacing_nifti(root: Path) -> None:
    _patched_nifti(root, _pixdim_x(-1.0))


def nan_spacing_nifti(root: Path) -> None:
    _patched_nifti(root, _pixdim_x(float("nan")))


def sheared_direction_nifti(root: Path) -> None:
    """No qform, and an sform whose first two axes are not perpendicular."""

    def shear(header: bytearray) -> None:
        struct.pack_into("<h", header, NIFTI_QFORM_CODE, 0)
        struct.pack_into("<h", header, NIFTI_SFORM_CODE, 1)
        rows = [(1.0, 0.5, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0)]
        struct.pack_into("<12f", header, NIFTI_SROW, *[v for row in rows for v in row])

    _patched_nifti(root, shear)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb_bytes(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` 8-bit grey pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + _png_chunk(b"IEND", b"")
    )


def decompression_bomb(root: Path) -> None:
    _bad_image(root, ".png").write_bytes(png_bomb_bytes())


# --- landmark files -------------------------------------------------------------------------------


def _csv_lines(root: Path) -> list[str]:
    """The bad case's landmarks as CSV lines (good image beside them)."""
    _good_image(root)
    _good_landmarks(root)
    path = root / "landmarks" / f"{BAD_CASE}.csv"
    lines = path.read_text().splitlines()
    path.unlink()
    return lines


def _write_csv(root: Path, lines: list[str]) -> None:
    (root / "landmarks" / f"{BAD_CASE}.csv").write_text("\n".join(lines) + "\n")


def csv_missing_column(root: Path) -> None:
    lines = _csv_lines(root)
    lines[4] = lines[4].rsplit(",", 1)[0]  # the row of the 3rd landmark loses its y
    _write_csv(root, lines)


def csv_text_in_number(root: Path) -> None:
    lines = _csv_lines(root)
    name, x, _ = lines[3].split(",")
    lines[3] = f"{name},{x},twelve"
    _write_csv(root, lines)


def csv_duplicate_names(root: Path) -> None:
    lines = _csv_lines(root)
    lines[3] = SYNTHETIC_LANDMARKS[0] + "," + lines[3].split(",", 1)[1]
    _write_csv(root, lines)


def _isbi_txt(root: Path, count: int) -> None:
    """ISBI pixel-position lines (unnamed: matched to dataset.json by count)."""
    _good_image(root)
    rows = [f"{3 + k},{4 + k}" for k in range(count)]
    (root / "landmarks" / f"{BAD_CASE}.txt").write_text("\n".join(rows) + "\n")


def too_many_points(root: Path) -> None:
    _isbi_txt(root, len(SYNTHETIC_LANDMARKS) + 1)


def too_few_points(root: Path) -> None:
    _isbi_txt(root, len(SYNTHETIC_LANDMARKS) - 2)


def wrong_coordinate_space(root: Path) -> None:
    """Points written in RAS into a file that declares LPS: x and y flip sign, far outside."""
    _good_image(root)
    landmarks = clean_pixels(7)[1]
    landmarks = LandmarkSet(landmarks.names, landmarks.points_mm * -1.0)
    write_landmarks(root / "landmarks" / f"{BAD_CASE}.csv", landmarks, space="LPS")


def invalid_landmark_json(root: Path) -> None:
    _good_image(root)
    (root / "landmarks" / f"{BAD_CASE}.json").write_text('{"format": "medlandmark.landmarks", ')


# --- dataset.json, splits and the folder ---------------------------------------------------------


def _dataset_json(root: Path, **changes) -> None:
    data = json.loads((root / "dataset.json").read_text())
    data.update(changes)
    (root / "dataset.json").write_text(json.dumps(data))  # json writes NaN as a bare NaN


def dataset_zero_spacing(root: Path) -> None:
    _dataset_json(root, spacing_mm=[0.0, 1.0])


def dataset_negative_spacing(root: Path) -> None:
    _dataset_json(root, spacing_mm=[-1.0, 1.0])


def dataset_nan_spacing(root: Path) -> None:
    _dataset_json(root, spacing_mm=[float("nan"), 1.0])


def dataset_invalid_json(root: Path) -> None:
    (root / "dataset.json").write_text('{"name": "corpus", "spatial_dims": 2,')


def empty_dataset(root: Path) -> None:
    shutil.rmtree(root / "images")
    shutil.rmtree(root / "landmarks")
    (root / "images").mkdir()
    (root / "landmarks").mkdir()


def case_id_escaping_the_folder(root: Path) -> None:
    (root / "splits.json").write_text(json.dumps({"train": [*CLEAN_CASES, "../outside"]}))


# --- the corpus ----------------------------------------------------------------------------------

_IMAGE = f"images/{BAD_CASE}"
_LANDMARKS = f"landmarks/{BAD_CASE}"

CORPUS: list[BadInput] = [
    BadInput("truncated_png", "image", f"{_IMAGE}.png", ("truncated",), truncated_png),
    BadInput("truncated_jpeg", "image", f"{_IMAGE}.jpg", ("truncated",), truncated_jpeg),
    BadInput("truncated_nifti_gz", "image", f"{_IMAGE}.nii.gz", ("truncated",), truncated_nifti_gz),
    BadInput("truncated_nifti", "image", f"{_IMAGE}.nii", ("truncated",), truncated_nifti),
    BadInput(
        "truncated_mha",
        "image",
        f"{_IMAGE}.mha",
        ("truncated", "its header declares"),
        truncated_mha,
    ),
    BadInput(
        "truncated_mhd_raw",
        "image",
        f"{_IMAGE}.mhd",
        ("voxel data file 'bad.raw' is truncated",),
        truncated_mhd_raw,
    ),
    BadInput("zero_byte_image", "image", f"{_IMAGE}.png", ("empty (0 bytes)",), zero_byte_image),
    BadInput(
        "wrong_magic_bytes", "image", f"{_IMAGE}.png", ("wrong magic bytes",), wrong_magic_bytes
    ),
    BadInput("nan_voxels", "image", f"{_IMAGE}.nii.gz", ("NaN or infinite",), nan_voxels),
    BadInput("inf_voxels", "image", f"{_IMAGE}.nii.gz", ("NaN or infinite",), inf_voxels),
    BadInput("image_4d", "image", f"{_IMAGE}.nii.gz", ("4 dimensions",), image_4d),
    BadInput("two_channels", "image", f"{_IMAGE}.nii.gz", ("2 channels",), two_channels),
    BadInput(
        "image_3d_in_2d_dataset", "image", f"{_IMAGE}.nii.gz", ("3D",), image_3d_in_2d_dataset
    ),
    BadInput(
        "zero_spacing_nifti",
        "image",
        f"{_IMAGE}.nii",
        ("pixdim) is 0 x 1 mm", "positive and finite"),
        zero_spacing_nifti,
    ),
    BadInput(
        "negative_spacing_nifti",
        "image",
        f"{_IMAGE}.nii",
        ("pixdim) is -1 x 1 mm", "positive and finite"),
        negative_spacing_nifti,
    ),
    BadInput(
        "nan_spacing_nifti",
        "image",
        f"{_IMAGE}.nii",
        ("pixdim) is nan x 1 mm", "positive and finite"),
        nan_spacing_nifti,
    ),
    BadInput(
        "sheared_direction_nifti",
        "image",
        f"{_IMAGE}.nii",
        ("orthonormal",),
        sheared_direction_nifti,
    ),
    BadInput(
        "decompression_bomb",
        "image",
        f"{_IMAGE}.png",
        ("60000 x 60000", "refusing to allocate"),
        decompression_bomb,
    ),
    BadInput(
        "csv_missing_column",
        "landmarks",
        f"{_LANDMARKS}.csv",
        ("row 4 has 2 fields, header has 3",),
        csv_missing_column,
    ),
    BadInput(
        "csv_text_in_number",
        "landmarks",
        f"{_LANDMARKS}.csv",
        ("'twelve' is not a number",),
        csv_text_in_number,
    ),
    BadInput(
        "csv_duplicate_names",
        "landmarks",
        f"{_LANDMARKS}.csv",
        ("duplicate landmark names", "tip_left"),
        csv_duplicate_names,
    ),
    BadInput(
        "too_many_points",
        "landmarks",
        f"{_LANDMARKS}.txt",
        ("holds 10 landmarks, expected 9",),
        too_many_points,
    ),
    BadInput(
        "too_few_points",
        "landmarks",
        f"{_LANDMARKS}.txt",
        ("holds 7 landmarks, expected 9",),
        too_few_points,
    ),
    BadInput(
        "wrong_coordinate_space",
        "landmarks",
        f"{_LANDMARKS}.csv",
        ("outside the image",),
        wrong_coordinate_space,
    ),
    BadInput(
        "invalid_landmark_json",
        "landmarks",
        f"{_LANDMARKS}.json",
        ("invalid JSON",),
        invalid_landmark_json,
    ),
    BadInput(
        "dataset_zero_spacing",
        "dataset",
        "dataset.json",
        ("spacing_mm", "positive"),
        dataset_zero_spacing,
    ),
    BadInput(
        "dataset_negative_spacing",
        "dataset",
        "dataset.json",
        ("spacing_mm", "positive"),
        dataset_negative_spacing,
    ),
    BadInput(
        "dataset_nan_spacing",
        "dataset",
        "dataset.json",
        ("spacing_mm", "positive"),
        dataset_nan_spacing,
    ),
    BadInput(
        "dataset_invalid_json", "dataset", "dataset.json", ("invalid JSON",), dataset_invalid_json
    ),
    BadInput("empty_dataset", "dataset", "images", ("holds no images",), empty_dataset),
    BadInput(
        "case_id_escaping_the_folder",
        "dataset",
        "splits.json",
        ("invalid case id", "../outside"),
        case_id_escaping_the_folder,
    ),
]
CORPUS_BY_NAME = {entry.name: entry for entry in CORPUS}


def build_corpus(folder: Path) -> dict[str, Path]:
    """Every entry as a dataset folder ``folder/<name>``: the corpus on disk, to look at."""
    return {entry.name: entry.build(folder / entry.name) for entry in CORPUS}


# --- fake public-dataset sources, for ``convert`` ------------------------------------------------


def isbi_source(root: Path, case_ids: tuple[str, ...] = ("001", "002")) -> Path:
    """The official ISBI 2015 layout in miniature: JPEGs and two annotators' txt files."""
    for number, case_id in enumerate(case_ids):
        (root / "RawImage" / "TrainingData").mkdir(parents=True, exist_ok=True)
        image = sitk.GetImageFromArray(clean_pixels(number)[0])
        sitk.WriteImage(image, str(root / "RawImage" / "TrainingData" / f"{case_id}.jpg"))
        rows = [f"{3 + k},{4 + k}" for k in range(19)] + ["1", "3"]  # points, then classes
        for annotator in ("400_senior", "400_junior"):
            (root / "AnnotationsByMD" / annotator).mkdir(parents=True, exist_ok=True)
            (root / "AnnotationsByMD" / annotator / f"{case_id}.txt").write_text(
                "\n".join(rows) + "\n"
            )
    return root


def hand_source(root: Path, case_ids: tuple[str, ...] = ("3001", "3002")) -> Path:
    """The hand X-ray layout in miniature: uncompressed MHA images and landmarks_px.csv."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["id," + ",".join(f"x{k},y{k}" for k in range(1, 38))]
    for number, case_id in enumerate(case_ids):
        image = sitk.GetImageFromArray(clean_pixels(number)[0])
        image.SetSpacing((0.15, 0.15))
        sitk.WriteImage(image, str(root / "images" / f"{case_id}.mha"), False)
        rows.append(case_id + "," + ",".join(f"{3 + k % 20},{4 + k % 25}" for k in range(37)))
    (root / "landmarks_px.csv").write_text("\n".join(rows) + "\n")
    return root


AFIDS_FCSV_HEADER = (
    "# Markups fiducial file version = 4.10\n# CoordinateSystem = 0\n"
    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
)


def afids_source(root: Path) -> tuple[Path, Path]:
    """A small 3D image and an .fcsv of 32 RAS points inside it."""
    root.mkdir(parents=True, exist_ok=True)
    image = root / "brain.nii.gz"
    geometry = Geometry.identity((12, 14, 16), (2.0, 2.0, 2.0))
    write_image(image, np.ones(geometry.shape, np.float32), geometry)
    rows = [
        f"vtkMRMLMarkupsFiducialNode_{k},{-(2 + k % 10)},{-(3 + k % 12)},{4 + k % 8},"
        f"0,0,0,1,1,1,0,{k},,"
        for k in range(1, 33)
    ]
    fcsv = root / "afids.fcsv"
    fcsv.write_text(AFIDS_FCSV_HEADER + "\n".join(rows) + "\n")
    return image, fcsv


if __name__ == "__main__":  # python -m tests.bad_inputs FOLDER: the corpus on disk, to look at
    import sys

    for name, root in build_corpus(Path(sys.argv[1])).items():
        print(f"{name}: {root}")
