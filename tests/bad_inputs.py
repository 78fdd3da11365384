"""A corpus of bad inputs, generated on demand (nothing binary is committed).

Each :class:`BadInput` writes one fault into a dataset folder that already holds clean cases
(:func:`clean_dataset`): a broken image, a broken landmark file, or a broken dataset.json /
splits.json / folder. ``offending`` is the file every error must name and ``needles`` what
it must say about it, whichever verb meets the fault first.
"""

from __future__ import annotations

import json
import os
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


def png_cut_at_20_bytes(root: Path) -> None:
    path = _bad_image(root, ".png")
    write_image(path, clean_pixels(7)[0], GEOMETRY)
    path.write_bytes(path.read_bytes()[:20])


def jpeg_named_png(root: Path) -> None:
    jpeg = root / "tmp.jpg"
    write_image(jpeg, clean_pixels(7)[0], GEOMETRY)
    jpeg.rename(_bad_image(root, ".png"))


def one_pixel_image(root: Path) -> None:
    write_image(_bad_image(root, ".png"), np.zeros((1, 1), np.uint8), Geometry.identity((1, 1)))


def mhd_data_file_outside(root: Path) -> None:
    """An MHD header whose ElementDataFile climbs out of the dataset."""
    path = _bad_image(root, ".mhd")
    sitk.WriteImage(sitk.GetImageFromArray(clean_pixels(7)[0]), str(path), False)
    text = path.read_text().replace(
        "ElementDataFile = bad.raw", "ElementDataFile = ../../../../etc/hostname"
    )
    path.write_text(text)


def mha_cut_in_header(root: Path) -> None:
    """An MHA cut before its ElementDataFile line (ITK would print MetaImage lines)."""
    path = _bad_image(root, ".mha")
    sitk.WriteImage(sitk.GetImageFromArray(clean_pixels(7)[0]), str(path), False)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"ElementType")])


def self_loop_symlink(root: Path) -> None:
    """images/bad.png is a symbolic link to itself."""
    path = root / "images" / f"{BAD_CASE}.png"
    path.symlink_to(path.name)


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
        "mha_cut_in_header",
        "image",
        f"{_IMAGE}.mha",
        ("MetaImage header is incomplete", "ElementType"),
        mha_cut_in_header,
    ),
    BadInput(
        "self_loop_symlink",
        "dataset",
        f"{_IMAGE}.png",
        ("symbolic link that leads nowhere",),
        self_loop_symlink,
    ),
    BadInput("png_cut_at_20_bytes", "image", f"{_IMAGE}.png", ("truncated",), png_cut_at_20_bytes),
    BadInput(
        "jpeg_named_png",
        "image",
        f"{_IMAGE}.png",
        ("is a JPEG image but is named .png", "rename it to .jpg"),
        jpeg_named_png,
    ),
    BadInput(
        "one_pixel_image",
        "image",
        f"{_IMAGE}.png",
        ("1 x 1 voxels", "too small"),
        one_pixel_image,
    ),
    BadInput(
        "mhd_data_file_outside",
        "image",
        f"{_IMAGE}.mhd",
        ("outside the image's folder",),
        mhd_data_file_outside,
    ),
    BadInput("wrong_magic_bytes", "image", f"{_IMAGE}.png", ("not a PNG file",), wrong_magic_bytes),
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


# --- bad command lines ---------------------------------------------------------------------------
# Each gets a prepared dataset (planned, preprocessed), a copy of a trained 2D run and an empty
# work folder, and is run through the real command line: the exit code and every needle (one
# line, naming ``named`` when given) are asserted.


@dataclass(frozen=True)
class Place:
    """Where a bad command runs: ``dataset`` (planned and preprocessed), ``run`` (a trained 2D
    U-Net's folder, a copy of its own) and ``work`` (empty)."""

    dataset: Path
    run: Path
    work: Path


@dataclass(frozen=True)
class BadCommand:
    """One bad command line: ``argv`` (made, with any file it needs, in a :class:`Place`), its
    exit code, what its error line says and, when the fault is a file, which file it names."""

    name: str
    argv: Callable[[Place], list]
    exit_code: int
    needles: tuple[str, ...]
    named: Callable[[Place], Path] | None = None


def _train(*options: str) -> Callable[[Place], list]:
    return lambda p: ["train", p.dataset, "-o", p.work / "run", "--device", "cpu", *options]


def _plan(*options: str) -> Callable[[Place], list]:
    return lambda p: ["plan", p.dataset, "--workers", "1", *options]


def _predict(*options: str) -> Callable[[Place], list]:
    return lambda p: [
        "predict",
        p.run,
        p.dataset / "images" / "case000.png",
        "-o",
        p.work / "out",
        *options,
    ]


def _edited_run_json(change: Callable[[dict], None]) -> Callable[[Place], list]:
    def argv(place: Place) -> list:
        path = place.run / "run.json"
        record = json.loads(path.read_text())
        change(record)
        path.write_text(json.dumps(record))
        return _predict()(place)

    return argv


def _quote_spatial_dims(record: dict) -> None:
    record["plan"]["spatial_dims"] = "2"


def _rename_landmarks(record: dict) -> None:
    record["landmarks"] = [f"other{i}" for i in range(len(record["landmarks"]))]


def _invalid_run_json(place: Place) -> list:
    (place.run / "run.json").write_text('{"arch": "unet", "configur')
    return _predict()(place)


def _weights_of_another_network(place: Place) -> list:
    from safetensors.numpy import save_file

    save_file(
        {"stem.weight": np.zeros((3, 3), np.float32)}, str(place.run / "model_best.safetensors")
    )
    return _predict()(place)


def _without_final_weights(place: Place) -> list:
    (place.run / "model_final.safetensors").unlink()
    return _predict("--weights", "final")(place)


def _output_is_a_file(place: Place) -> list:
    place.work.mkdir(parents=True, exist_ok=True)
    (place.work / "out").write_text("a file")
    return _predict()(place)


def _existing_run(place: Place) -> list:
    return ["train", place.dataset, "-o", place.run, "--device", "cpu", "--fold", "all"]


def _resume_from_pickle(place: Place) -> list:
    """A checkpoint whose pickle would run a command when loaded."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (place.run / "checkpoint_latest.pt").write_bytes(pickle.dumps({"model": Payload()}))
    record = json.loads((place.run / "run.json").read_text())
    record["status"] = "interrupted"  # a finished run is not resumed: its checkpoint stays unread
    (place.run / "run.json").write_text(json.dumps(record))
    return ["train", place.dataset, "-o", place.run, "--device", "cpu", "--fold", "all", "--resume"]


def _coarse_run_for_a_single_stage(place: Place) -> list:
    return _train("--coarse-run", str(place.run), "--fold", "all")(place)


def _edited_isbi_splits(place: Place) -> list:
    from medlandmark.datasets.converters import convert_isbi2015

    source = isbi_source(place.work / "src", ("001", "002", "003"))
    out = convert_isbi2015(source, place.work / "isbi")
    spec = json.loads((out / "dataset.json").read_text())
    spec["splits"] = {"train": ["001", "002"], "test1": ["003"]}
    (out / "dataset.json").write_text(json.dumps(spec))
    return ["convert", "isbi2015", source, out]


def _landmark_folder_elsewhere(place: Place) -> list:
    return ["check", place.work / "no_such_dataset"]


def _evaluate(*options: str) -> Callable[[Place], list]:
    def argv(place: Place) -> list:
        return [
            "evaluate",
            "--pred",
            place.dataset / "landmarks",
            "--gt",
            place.dataset,
            "--out",
            place.work / "eval",
            *options,
        ]

    return argv


COMMANDS: list[BadCommand] = [
    # plan: every option checked before any work
    BadCommand("plan_gpu_memory_zero", _plan("--gpu-memory", "0"), 2, ("--gpu-memory", "positive")),
    BadCommand(
        "plan_gpu_memory_nan", _plan("--gpu-memory", "nan"), 2, ("--gpu-memory", "positive")
    ),
    BadCommand(
        "plan_gpu_memory_text",
        _plan("--gpu-memory", "lots"),
        2,
        ("--gpu-memory", "expected a number"),
    ),
    BadCommand(
        "plan_base_features_zero",
        _plan("--base-features", "0"),
        2,
        ("--base-features", "1 or more"),
    ),
    BadCommand("plan_width_zero", _plan("--width", "0"), 2, ("--width", "positive")),
    BadCommand(
        "plan_target_spacing_negative",
        _plan("--target-spacing", "-1"),
        2,
        ("--target-spacing", "positive"),
    ),
    BadCommand(
        "plan_workers_zero",
        lambda p: ["plan", p.dataset, "--workers", "0"],
        2,
        ("--workers", "1 or more"),
    ),
    BadCommand(
        "check_missing_folder",
        _landmark_folder_elsewhere,
        2,
        ("does not exist",),
        lambda p: p.work / "no_such_dataset",
    ),
    BadCommand(
        "check_a_file",
        lambda p: ["check", p.dataset / "dataset.json"],
        2,
        ("not a folder",),
        lambda p: p.dataset / "dataset.json",
    ),
    BadCommand(
        "preprocess_unknown_configuration",
        lambda p: ["preprocess", p.dataset, "-c", "3d_huge"],
        2,
        ("3d_huge",),
    ),
    # train: options, settings, recipes and run folders, refused before anything is written
    BadCommand(
        "train_epochs_zero", _train("--epochs", "0"), 2, ("epochs", "greater than or equal to 1")
    ),
    BadCommand(
        "train_iterations_zero",
        _train("--iterations", "0"),
        2,
        ("iterations_per_epoch", "greater than or equal to 1"),
    ),
    BadCommand(
        "train_batch_size_zero",
        _train("--batch-size", "0"),
        2,
        ("batch_size", "greater than or equal to 1"),
    ),
    BadCommand(
        "train_batch_size_huge",
        _train("--batch-size", "10000000"),
        2,
        ("batch size 10000000 needs", "use --batch-size"),
    ),
    BadCommand("train_ema_two", _train("--ema", "2"), 2, ("ema_decay", "less than 1")),
    BadCommand("train_lr_zero", _train("--lr", "0"), 2, ("--lr", "positive")),
    BadCommand("train_lr_nan", _train("--lr", "nan"), 2, ("--lr", "positive")),
    BadCommand(
        "train_validate_every_zero",
        _train("--validate-every", "0"),
        2,
        ("validate_every", "greater than or equal to 1"),
    ),
    BadCommand(
        "train_fold_out_of_range", _train("--fold", "7"), 2, ("fold 7 does not exist", "5 folds")
    ),
    BadCommand("train_fold_negative", _train("--fold", "-1"), 2, ("fold -1 does not exist",)),
    BadCommand(
        "train_fold_text", _train("--fold", "first"), 2, ("--fold", "fold number", "'first'")
    ),
    BadCommand("train_unknown_configuration", _train("-c", "3d_huge"), 2, ("3d_huge",)),
    BadCommand("train_h3de_on_a_2d_plan", _train("-a", "h3de"), 2, ("h3de",)),
    BadCommand(
        "train_recipe_of_another_network",
        _train("--recipe", "h3de-paper", "-a", "hyatt"),
        2,
        ("h3de-paper trains h3de, not hyatt",),
    ),
    BadCommand(
        "train_unknown_recipe",
        _train("--recipe", "nnunet-paper"),
        2,
        ("--recipe", "invalid choice"),
    ),
    BadCommand(
        "train_augment_out_of_range",
        _train("--augment", "p_rotation=2"),
        2,
        ("bad augmentation setting", "p_rotation"),
    ),
    BadCommand(
        "train_augment_unknown_name",
        _train("--augment", "wobble=1"),
        2,
        ("bad augmentation setting", "wobble"),
    ),
    BadCommand(
        "train_augment_without_value",
        _train("--augment", "p_rotation"),
        2,
        ("--augment", "NAME=VALUE"),
    ),
    BadCommand(
        "train_time_budget_zero", _train("--time-budget", "0"), 2, ("--time-budget", "positive")
    ),
    BadCommand(
        "train_device_cuda_without_cuda",
        _train("--device", "cuda"),
        2,
        ("--device cuda", "no CUDA device"),
    ),
    BadCommand(
        "train_device_unknown", _train("--device", "tpu9"), 2, ("--device tpu9", "not a device")
    ),
    BadCommand(
        "train_coarse_run_for_a_single_stage",
        _coarse_run_for_a_single_stage,
        2,
        ("--coarse-run is for a cascade's fine stage",),
    ),
    BadCommand("train_into_an_existing_run", _existing_run, 2, ("--resume",), lambda p: p.run),
    BadCommand(
        "train_resume_from_a_pickle",
        _resume_from_pickle,
        2,
        ("refused to load", "could run code"),
        lambda p: p.run / "checkpoint_latest.pt",
    ),
    # predict: the run folder, its weights and the output folder
    BadCommand(
        "predict_device_cuda_without_cuda", _predict("--device", "cuda"), 2, ("no CUDA device",)
    ),
    BadCommand(
        "predict_spacing_zero", _predict("--spacing", "0", "1"), 2, ("--spacing", "positive")
    ),
    BadCommand(
        "predict_not_a_run",
        lambda p: [
            "predict",
            p.dataset,
            p.dataset / "images" / "case000.png",
            "-o",
            p.work / "out",
        ],
        2,
        ("no trained run here", "no run.json"),
    ),
    BadCommand(
        "predict_invalid_run_json",
        _invalid_run_json,
        2,
        ("invalid run.json",),
        lambda p: p.run / "run.json",
    ),
    BadCommand(
        "predict_run_json_number_in_quotes",
        _edited_run_json(_quote_spatial_dims),
        2,
        ("spatial_dims", "write the number without quotes"),
        lambda p: p.run / "run.json",
    ),
    BadCommand(
        "predict_weights_of_another_network",
        _weights_of_another_network,
        2,
        ("weights do not fit", "unexpected, e.g. stem.weight", "another plan or architecture"),
        lambda p: p.run / "model_best.safetensors",
    ),
    BadCommand(
        "predict_final_weights_missing",
        _without_final_weights,
        2,
        ("weights file does not exist",),
        lambda p: p.run / "model_final.safetensors",
    ),
    BadCommand(
        "predict_output_is_a_file",
        _output_is_a_file,
        2,
        ("is a file, not a folder",),
        lambda p: p.work / "out",
    ),
    BadCommand(
        "predict_input_missing",
        lambda p: ["predict", p.run, p.work / "nope.png", "-o", p.work / "out"],
        1,
        ("does not exist",),
        lambda p: p.work / "nope.png",
    ),
    # evaluate, export, convert
    BadCommand("evaluate_radius_zero", _evaluate("--radii", "0"), 2, ("--radii", "positive")),
    BadCommand(
        "evaluate_radius_text", _evaluate("--radii", "two"), 2, ("--radii", "numbers in mm")
    ),
    BadCommand(
        "evaluate_missing_predictions",
        lambda p: [
            "evaluate",
            "--pred",
            p.work / "none",
            "--gt",
            p.dataset,
            "--out",
            p.work / "eval",
        ],
        2,
        ("does not exist",),
        lambda p: p.work / "none",
    ),
    BadCommand(
        "export_opset_too_old",
        lambda p: ["export", p.run, "--onnx", p.work / "m.onnx", "--opset", "10"],
        2,
        ("opset 10 is too old",),
    ),
    BadCommand(
        "convert_missing_source",
        lambda p: ["convert", "isbi2015", p.work / "nowhere", p.work / "out"],
        2,
        ("RawImage",),
    ),
    BadCommand(
        "convert_over_edited_splits",
        _edited_isbi_splits,
        2,
        ("other splits", "--force"),
        lambda p: p.work / "isbi" / "dataset.json",
    ),
]
