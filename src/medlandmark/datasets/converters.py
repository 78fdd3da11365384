"""Converters from public datasets, as distributed, to medlandmark dataset folders.

Each converter checks its whole source before writing, writes every file atomically and
``dataset.json`` last (a folder without it is an unfinished conversion), and returns ``out``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlandmark import console
from medlandmark.datasets.dataset import (
    DATASET_FILE,
    DatasetSpec,
    discover_cases,
    load_spec,
    valid_case_id,
    write_spec,
)
from medlandmark.errors import DatasetError, ImageError, LandmarkFileError
from medlandmark.io.files import atomic_path, full_suffix, stem
from medlandmark.io.geometry import Geometry, itk_index_to_world
from medlandmark.io.images import check_image_complete, read_image, read_image_info, write_image
from medlandmark.io.landmarks import (
    LandmarkSet,
    read_landmark_table,
    read_landmarks,
    write_landmarks,
)

ISBI_LANDMARKS = [
    "sella",
    "nasion",
    "orbitale",
    "porion",
    "subspinale",
    "supramentale",
    "pogonion",
    "menton",
    "gnathion",
    "gonion",
    "lower_incisal_incision",
    "upper_incisal_incision",
    "upper_lip",
    "lower_lip",
    "subnasale",
    "soft_tissue_pogonion",
    "posterior_nasal_spine",
    "anterior_nasal_spine",
    "articulare",
]
ISBI_SPACING_MM = [0.1, 0.1]
ISBI_SPLIT_FOLDERS = {"train": "TrainingData", "test1": "Test1Data", "test2": "Test2Data"}
ISBI_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".bmp")
ISBI_ANNOTATORS = {"senior": "400_senior", "junior": "400_junior"}
ISBI_GROUND_TRUTH = {
    "mean": "mean of the senior and junior annotators",
    "senior": "senior annotator",
    "junior": "junior annotator",
}

HAND_LANDMARKS = [f"p{k:02d}" for k in range(1, 38)]

AFIDS_LANDMARKS = [
    "AC",
    "PC",
    "ICS",
    "PMJ",
    "SIPF",
    "RSLMS",
    "LSLMS",
    "RILMS",
    "LILMS",
    "CUL",
    "IMS",
    "RMB",
    "LMB",
    "PG",
    "RLVAC",
    "LLVAC",
    "RLVPC",
    "LLVPC",
    "GENU",
    "SPLE",
    "RALTH",
    "LALTH",
    "RSAMTH",
    "LSAMTH",
    "RIAMTH",
    "LIAMTH",
    "RIGO",
    "LIGO",
    "RVOH",
    "LVOH",
    "ROSF",
    "LOSF",
]
AFIDS_SYMMETRIC_PAIRS = [
    ("RSLMS", "LSLMS"),
    ("RILMS", "LILMS"),
    ("RMB", "LMB"),
    ("RLVAC", "LLVAC"),
    ("RLVPC", "LLVPC"),
    ("RALTH", "LALTH"),
    ("RSAMTH", "LSAMTH"),
    ("RIAMTH", "LIAMTH"),
    ("RIGO", "LIGO"),
    ("RVOH", "LVOH"),
    ("ROSF", "LOSF"),
]

HAND_TEST_EVERY = 4  # hand X-rays: every fourth case (in id order) is held out for testing
# Entries a dataset folder may hold before its dataset.json is written (an unfinished conversion).
DATASET_ENTRIES = {"images", "landmarks", DATASET_FILE, "splits.json"}


@dataclass(frozen=True)
class _ConvertedCase:
    """One case ready to write: its source image and its landmarks in world mm."""

    case_id: str
    image_path: Path
    landmarks: LandmarkSet
    geometry: Geometry


# --- ISBI 2015 ---------------------------------------------------------------------------------


def convert_isbi2015(src: Path, out: Path, annotator: str = "mean", force: bool = False) -> Path:
    """ISBI 2015 cephalograms (official layout) -> dataset with splits train/test1[/test2];
    ``force`` replaces the splits of an existing dataset.json that differ."""
    src, out = Path(src), Path(out)
    if annotator not in ISBI_GROUND_TRUTH:
        raise DatasetError(f"unknown annotator '{annotator}' (use mean, senior or junior)")
    splits = _isbi_images_by_split(src)
    annotation_dirs = _isbi_annotation_dirs(src, annotator)
    check_output_dataset(out, ISBI_LANDMARKS)
    images = [image for split_images in splits.values() for image in split_images]
    cases = [
        _isbi_case(image, annotation_dirs)
        for image in console.progress(images, description="reading ISBI 2015")
    ]
    spec = DatasetSpec(
        name="isbi2015",
        spatial_dims=2,
        landmarks=ISBI_LANDMARKS,
        modalities=["xray"],
        spacing_mm=ISBI_SPACING_MM,
        splits={name: [_isbi_case_id(p) for p in images] for name, images in splits.items()},
        description=(
            "ISBI 2015 grand challenge on automatic cephalometric landmark detection: lateral "
            "cephalograms, 1935 x 2400 pixels of 0.1 mm, 19 landmarks. Ground truth: "
            f"{ISBI_GROUND_TRUTH[annotator]}."
        ),
        reference=(
            "Wang C-W et al. A benchmark for comparison of dental radiography analysis "
            "algorithms. Medical Image Analysis 31:63-76, 2016."
        ),
        license="Research use, as granted by the ISBI 2015 challenge organisers.",
    )
    _write_dataset(
        out, cases, spec, landmark_suffix=".csv", what=f"ISBI 2015 ({annotator})", force=force
    )
    return out


def _isbi_images_by_split(src: Path) -> dict[str, list[Path]]:
    raw = src / "RawImage"
    if not raw.is_dir():
        raise DatasetError(
            "not the ISBI 2015 layout: no RawImage/ folder (expected RawImage/TrainingData, "
            "RawImage/Test1Data[, RawImage/Test2Data] and AnnotationsByMD/)",
            src,
        )
    splits: dict[str, list[Path]] = {}
    seen: dict[str, Path] = {}
    for split, folder_name in ISBI_SPLIT_FOLDERS.items():
        folder = raw / folder_name
        if not folder.is_dir():
            continue
        images = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and full_suffix(p) in ISBI_IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        for image in images:
            case_id = _isbi_case_id(image)
            if case_id in seen:
                raise DatasetError(f"image '{case_id}' appears twice (also {seen[case_id]})", image)
            seen[case_id] = image
        if images:
            splits[split] = images
    if not splits:
        folders = ", ".join(ISBI_SPLIT_FOLDERS.values())
        raise DatasetError(f"no .jpg/.bmp images in any of {folders}", raw)
    return splits


def _isbi_case_id(image: Path) -> str:
    case_id = stem(image)
    if not re.fullmatch(r"\d{3}", case_id):
        raise DatasetError("ISBI 2015 images are named NNN.jpg or NNN.bmp (three digits)", image)
    return case_id


def _isbi_annotation_dirs(src: Path, annotator: str) -> list[Path]:
    names = list(ISBI_ANNOTATORS) if annotator == "mean" else [annotator]
    folders = [src / "AnnotationsByMD" / ISBI_ANNOTATORS[name] for name in names]
    for folder in folders:
        if not folder.is_dir():
            raise DatasetError(
                f"not the ISBI 2015 layout: annotation folder {folder.name}/ is missing "
                f"(needed for annotator '{annotator}')",
                folder,
            )
    return folders


def _isbi_case(image: Path, annotation_dirs: Sequence[Path]) -> _ConvertedCase:
    case_id = _isbi_case_id(image)
    geometry = read_image_info(image, spacing_xy_mm=ISBI_SPACING_MM).geometry
    check_image_complete(image)  # the file is linked, not decoded: a truncated one shows here
    sets = []
    for folder in annotation_dirs:
        path = folder / f"{case_id}.txt"
        if not path.is_file():
            raise LandmarkFileError(f"annotation for image {image.name} is missing", path)
        sets.append(read_landmarks(path, geometry=geometry, names=ISBI_LANDMARKS))
    points_mm = np.mean([s.points_mm for s in sets], axis=0)
    landmarks = LandmarkSet(ISBI_LANDMARKS, points_mm)
    warn_landmarks_outside(landmarks, geometry, image)
    return _ConvertedCase(case_id, image, landmarks, geometry)


# --- Digital Hand Atlas --------------------------------------------------------------------------


def convert_hand_xray(src: Path, out: Path, force: bool = False) -> Path:
    """Hand radiographs (``images/*.mha`` + ``landmarks_px.csv`` in pixels) -> dataset with
    splits train and test (every fourth case by id); ``force`` as for ISBI 2015."""
    src, out = Path(src), Path(out)
    images = _hand_images(src)
    table_path = src / "landmarks_px.csv"
    if not table_path.is_file():
        raise DatasetError(
            "landmarks_px.csv (id,x1,y1,...,x37,y37 in pixels) is missing", table_path
        )
    table = read_landmark_table(table_path, ndim=2)
    _check_hand_pairs(images, table, table_path)
    check_output_dataset(out, HAND_LANDMARKS)
    cases = [
        _hand_case(case_id, images[case_id], table[case_id])
        for case_id in console.progress(sorted(images), description="reading hand X-rays")
    ]
    spec = DatasetSpec(
        name="hand_xray",
        spatial_dims=2,
        landmarks=HAND_LANDMARKS,
        modalities=["xray"],
        splits=hand_xray_splits(sorted(images)),
        description=(
            "Hand radiographs of the Digital Hand Atlas with 37 landmarks (finger tips and joints, "
            "wrist); pixel spacing from each image header."
        ),
        reference=(
            "Gertych A et al. Bone age assessment of children using a digital hand atlas. "
            "Computerized Medical Imaging and Graphics 31(4-5):322-331, 2007; landmarks: Payer C "
            "et al. Integrating spatial configuration into heatmap regression based CNNs for "
            "landmark localization. Medical Image Analysis 54:207-219, 2019."
        ),
        license="Research use, as granted by the Digital Hand Atlas and the landmark authors.",
    )
    _write_dataset(out, cases, spec, landmark_suffix=".csv", what="hand X-ray", force=force)
    return out


def hand_xray_splits(case_ids: Sequence[str]) -> dict[str, list[str]]:
    """A fixed held-out test split: every fourth case in id order (a quarter, spread over the
    atlas's ages and sexes, which its ids group), the rest for training."""
    ordered = sorted(case_ids)
    test = ordered[HAND_TEST_EVERY - 1 :: HAND_TEST_EVERY]
    train = [c for i, c in enumerate(ordered) if i % HAND_TEST_EVERY != HAND_TEST_EVERY - 1]
    return {"train": train, "test": test} if test else {"train": train}


def _hand_images(src: Path) -> dict[str, Path]:
    folder = src / "images"
    if not folder.is_dir():
        raise DatasetError("not the hand X-ray layout: no images/ folder of .mha files", src)
    images = {stem(p): p for p in sorted(folder.glob("*.mha")) if not p.name.startswith(".")}
    if not images:
        raise DatasetError("no .mha images", folder)
    for case_id, path in images.items():
        if not valid_case_id(case_id):
            raise DatasetError(
                f"invalid case id '{case_id}' (letters, digits, '.', '_', '-')", path
            )
    return images


def _check_hand_pairs(
    images: dict[str, Path], table: dict[str, np.ndarray], table_path: Path
) -> None:
    without_row = sorted(set(images) - set(table))
    if without_row:
        raise LandmarkFileError(f"no landmark row for images: {', '.join(without_row)}", table_path)
    without_image = sorted(set(table) - set(images))
    if without_image:
        raise DatasetError(
            f"landmark rows without an image in images/: {', '.join(without_image)}", table_path
        )
    counts = {len(points) for points in table.values()}
    if counts != {len(HAND_LANDMARKS)}:
        raise LandmarkFileError(
            f"rows hold {sorted(counts)} landmarks, expected {len(HAND_LANDMARKS)} (x,y pairs)",
            table_path,
        )


def _hand_case(case_id: str, image: Path, points_px: np.ndarray) -> _ConvertedCase:
    geometry = read_image_info(image).geometry
    check_image_complete(image)
    if geometry.ndim != 2:
        raise ImageError(f"expected a 2D radiograph, got a {geometry.ndim}D image", image)
    landmarks = LandmarkSet(HAND_LANDMARKS, itk_index_to_world(points_px, geometry))
    warn_landmarks_outside(landmarks, geometry, image)
    return _ConvertedCase(case_id, image, landmarks, geometry)


# --- AFIDs ---------------------------------------------------------------------------------------


def convert_afids(image: Path, fcsv: Path, out: Path, case_id: str | None = None) -> Path:
    """One 3D case from an image and its 32 AFIDs (Slicer .fcsv/.mrk.json), added to ``out``."""
    image, fcsv, out = Path(image), Path(fcsv), Path(out)
    case_id = stem(image) if case_id is None else case_id
    if not valid_case_id(case_id):
        raise DatasetError(
            f"invalid case id '{case_id}' (letters, digits, '.', '_', '-'); "
            "give one with --case-id",
            image,
        )
    info = read_image_info(image)
    check_image_complete(image)
    if info.geometry.ndim != 3 or info.channels != 1:
        raise ImageError(
            f"AFIDs need a 3D single-channel image, got {info.geometry.ndim}D with "
            f"{info.channels} channels",
            image,
        )
    landmarks = read_afids_landmarks(fcsv)
    warn_landmarks_outside(landmarks, info.geometry, fcsv)
    spec = _afids_spec(out)
    refuse_other_files_of_case(out, case_id)
    image_out = out / "images" / f"{case_id}.nii.gz"
    if full_suffix(image) == ".nii.gz":
        _place_file(image, image_out)
    else:
        data = read_image(image)
        write_image(image_out, data.array, data.geometry)
    write_landmarks(out / "landmarks" / f"{case_id}.mrk.json", landmarks, space="LPS")
    write_spec(out, spec)
    total = len(discover_cases(out)[0])
    console.info(f"wrote AFIDs case '{case_id}' to {out} (cases in the dataset: {total})")
    return out


def read_afids_landmarks(path: Path) -> LandmarkSet:
    """The file's points named by their order (the AFIDs protocol numbers them 1..32)."""
    points = read_landmarks(path, ndim=3)
    if len(points.names) != len(AFIDS_LANDMARKS):
        raise LandmarkFileError(
            f"file holds {len(points.names)} points; AFIDs have {len(AFIDS_LANDMARKS)} "
            f"({', '.join(AFIDS_LANDMARKS)}), in this order",
            path,
        )
    return LandmarkSet(AFIDS_LANDMARKS, points.points_mm)


def _afids_spec(out: Path) -> DatasetSpec:
    """The spec of the AFIDs dataset in ``out``: the existing one, or a new one."""
    if (out / DATASET_FILE).is_file():
        spec = load_spec(out)
        if spec.landmarks != AFIDS_LANDMARKS or spec.spatial_dims != 3:
            raise DatasetError(
                f"{out} holds a different dataset ({spec.spatial_dims}D, landmarks "
                f"{', '.join(spec.landmarks[:5])}...); choose another output folder",
                out / DATASET_FILE,
            )
        return spec
    _refuse_foreign_folder(out)
    return DatasetSpec(
        name="afids",
        spatial_dims=3,
        landmarks=AFIDS_LANDMARKS,
        modalities=["mr"],
        symmetric_pairs=AFIDS_SYMMETRIC_PAIRS,
        description="Anatomical fiducials (AFIDs): 32 landmarks on T1-weighted brain MRI.",
        reference=(
            "Lau JC et al. A framework for evaluating correspondence between brain images using "
            "anatomical fiducials. Human Brain Mapping 40(14):4163-4179, 2019; Taha A et al. "
            "Magnetic resonance imaging datasets with anatomical fiducials for quality control "
            "and registration. Scientific Data 10:449, 2023."
        ),
        license="AFIDs landmarks CC-BY-4.0; images under their own licences.",
    )


def refuse_other_files_of_case(out: Path, case_id: str) -> None:
    """A case already stored under another suffix would give the dataset a duplicate id."""
    for folder, kept in (("images", ".nii.gz"), ("landmarks", ".mrk.json")):
        if not (out / folder).is_dir():
            continue
        for entry in (out / folder).iterdir():
            if (
                stem(entry) == case_id
                and full_suffix(entry) != kept
                and not entry.name.startswith(".")
            ):
                raise DatasetError(
                    f"case '{case_id}' is already stored as {entry.name}; remove it or choose "
                    "another --case-id",
                    entry,
                )


# --- shared steps --------------------------------------------------------------------------------


def check_output_dataset(out: Path, landmark_names: Sequence[str]) -> None:
    """``out`` must be new, empty, or a dataset of the same landmarks (which is then replaced)."""
    if (out / DATASET_FILE).is_file():
        spec = load_spec(out)
        if spec.landmarks != list(landmark_names):
            raise DatasetError(
                f"{out} holds a different dataset (landmarks {', '.join(spec.landmarks[:5])}...); "
                "choose an empty or new output folder",
                out / DATASET_FILE,
            )
        return
    _refuse_foreign_folder(out)


def _refuse_foreign_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError("output exists and is not a folder", out)
    if not out.is_dir():
        return
    entries = [e.name for e in out.iterdir() if not e.name.startswith(".")]
    foreign = sorted(name for name in entries if name not in DATASET_ENTRIES)
    if foreign:
        listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise DatasetError(
            f"output folder is not empty and is not a medlandmark dataset (holds {listed}); "
            "choose an empty or new folder",
            out,
        )


def _write_dataset(
    out: Path,
    cases: Sequence[_ConvertedCase],
    spec: DatasetSpec,
    landmark_suffix: str,
    what: str,
    force: bool = False,
) -> None:
    """Images and landmark files first, ``dataset.json`` last (an old one goes first, so that a
    conversion stopped half-way shows). An existing dataset.json whose splits differ from the
    conversion's (edited by hand) is kept unless ``force``."""
    _refuse_to_replace_edited_splits(out, spec, force)
    (out / DATASET_FILE).unlink(missing_ok=True)
    for case in console.progress(cases, description=f"writing {out}"):
        _place_file(
            case.image_path, out / "images" / f"{case.case_id}{full_suffix(case.image_path)}"
        )
        write_landmarks(
            out / "landmarks" / f"{case.case_id}{landmark_suffix}", case.landmarks, case.geometry
        )
    found, problems = discover_cases(out)
    stale = sorted({c.case_id for c in found} - {case.case_id for case in cases})
    if stale:
        console.warn(
            f"{out} also holds cases this conversion did not write: {', '.join(stale[:10])}"
        )
    for problem in problems:
        console.warn(str(problem))
    write_spec(out, spec)
    console.info(f"wrote {len(cases)} {what} cases to {out}")


def _refuse_to_replace_edited_splits(out: Path, spec: DatasetSpec, force: bool) -> None:
    """A DatasetError, before anything is written, when ``out``'s dataset.json has splits other
    than ``spec``'s and ``force`` is off; with ``force``, a warning saying what is replaced."""
    if not (out / DATASET_FILE).is_file():
        return
    previous = load_spec(out).splits
    if previous == spec.splits:
        return
    old, new = _splits_text(previous), _splits_text(spec.splits)
    if force:
        console.warn(
            f"{out / DATASET_FILE}: its splits ({old}) are replaced by the conversion's ({new})"
        )
        return
    raise DatasetError(
        f"already holds this dataset with other splits ({old}) than the conversion writes "
        f"({new}); converting again would replace them: pass --force to do that, or convert into "
        "a new folder",
        out / DATASET_FILE,
    )


def _splits_text(splits: dict[str, list[str]] | None) -> str:
    if not splits:
        return "none"
    return ", ".join(f"{name} {len(ids)} cases" for name, ids in splits.items())


def _place_file(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` atomically: a hard link where possible, else a byte copy."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def warn_landmarks_outside(landmarks: LandmarkSet, geometry: Geometry, path: Path) -> None:
    """Warn, naming ``path``, about present landmarks that lie outside the image."""
    inside = geometry.contains_world(landmarks.points_mm)
    outside = [
        n for n, i, p in zip(landmarks.names, inside, landmarks.present, strict=True) if p and not i
    ]
    if outside:
        console.warn(f"{path}: landmarks outside the image: {', '.join(outside)}")
