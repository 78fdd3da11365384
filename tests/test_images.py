"""Images with geometry: every format reads back with its geometry; bad files give our error."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from medlandmark.errors import ImageError
from medlandmark.io.geometry import Geometry, index_to_world
from medlandmark.io.images import read_image, read_image_info, write_image

from .conftest import shared_path


def _oblique(shape: tuple[int, ...], spacing: tuple[float, ...]) -> Geometry:
    ndim = len(shape)
    direction = (
        Rotation.random(random_state=4).as_matrix()
        if ndim == 3
        else np.array([[0.6, -0.8], [0.8, 0.6]])
    )
    return Geometry(spacing, (10.0, -5.0, 2.5)[:ndim], tuple(map(tuple, direction)), shape)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_geometry_formats_round_trip(tmp_path: Path, suffix: str, ndim: int) -> None:
    shape = (5, 6, 7)[-ndim:]
    geometry = _oblique(shape, (3.0, 0.8, 0.5)[-ndim:])
    voxels = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    path = tmp_path / f"img{suffix}"
    write_image(path, voxels, geometry)
    image = read_image(path)
    assert image.array.shape == (1, *shape)
    np.testing.assert_array_equal(image.array[0], voxels)
    assert np.allclose(image.geometry.spacing_mm, geometry.spacing_mm)
    assert np.allclose(image.geometry.direction_matrix, geometry.direction_matrix, atol=1e-6)
    assert np.allclose(image.geometry.origin_mm, geometry.origin_mm)
    assert not list(tmp_path.glob(".*partial*")), "temporary files left behind"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_2d_formats_take_spacing_from_caller_and_refuse_without(
    tmp_path: Path, suffix: str
) -> None:
    voxels = (np.arange(12 * 10).reshape(12, 10) % 200).astype(np.uint8)
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path))
    image = read_image(path, spacing_xy_mm=(0.1, 0.2))
    assert image.array.shape == (1, 12, 10)
    assert image.geometry.spacing_mm == (0.2, 0.1)  # array order: rows (y), then columns (x)
    with pytest.raises(ImageError, match="store no pixel spacing") as raised:
        read_image(path)
    assert str(path) in str(raised.value)
    assert read_image(path, allow_missing_spacing=True).geometry.spacing_mm == (1.0, 1.0)


def test_rgb_becomes_grey(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 200, 50
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c.png"))
    image = read_image(tmp_path / "c.png", spacing_xy_mm=(1, 1))
    assert image.array.shape == (1, 4, 5)
    np.testing.assert_allclose(image.array, 0.299 * 100 + 0.587 * 200 + 0.114 * 50, rtol=1e-5)


def test_single_slice_3d_is_2d(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.ones((1, 8, 9), np.uint8))
    image.SetSpacing((0.15, 0.15, 0.15))
    image.SetOrigin((3.0, 4.0, 0.0))
    sitk.WriteImage(image, str(tmp_path / "hand.mha"))
    read = read_image(tmp_path / "hand.mha")
    assert read.array.shape == (1, 8, 9)
    assert read.geometry.spacing_mm == (0.15, 0.15)
    np.testing.assert_allclose(index_to_world([[1, 2]], read.geometry), [[3.0 + 0.3, 4.0 + 0.15]])


def test_multichannel_image_keeps_channels(tmp_path: Path) -> None:
    voxels = np.random.default_rng(1).normal(size=(2, 4, 5, 6)).astype(np.float32)
    write_image(tmp_path / "two.nii.gz", voxels, Geometry.identity((4, 5, 6)))
    image = read_image(tmp_path / "two.nii.gz")
    assert image.channels == 2
    np.testing.assert_array_equal(image.array, voxels)


def test_dicom_series_folder(tmp_path: Path) -> None:
    volume = (np.arange(4 * 6 * 5).reshape(4, 6, 5) * 10).astype(np.int16)
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.shape[0]):
        slice_ = sitk.GetImageFromArray(volume[z])
        slice_.SetSpacing((0.7, 0.6))
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.3",
            "0020|000e": "1.2.3.4",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": f"-10\\20\\{z * 2.5}",
            "0020|0013": str(z + 1),
            "0028|0030": "0.6\\0.7",
            "0018|0050": "2.5",
        }.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(slice_)
    image = read_image(folder)
    assert image.array.shape == (1, 4, 6, 5)
    np.testing.assert_array_equal(image.array[0], volume)
    np.testing.assert_allclose(image.geometry.spacing_mm, (2.5, 0.6, 0.7), atol=1e-6)
    np.testing.assert_allclose(image.geometry.origin_mm, (-10, 20, 0))


def _real_bytes(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".mha"])
def test_truncated_images_are_refused(tmp_path: Path, suffix: str) -> None:
    voxels = np.random.default_rng(2).integers(0, 255, (64, 64), dtype=np.uint8)
    good = tmp_path / f"good{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(good))
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated") as raised:
        read_image(bad, spacing_xy_mm=(1, 1))
    assert str(bad) in str(raised.value)


@pytest.mark.parametrize(
    ("content", "needle"), [(b"", "empty"), (b"this is not an image at all", "not a PNG file")]
)
def test_empty_and_wrong_magic_are_refused(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=needle):
        read_image(path, spacing_xy_mm=(1, 1))


def test_nan_voxels_are_refused(tmp_path: Path) -> None:
    voxels = np.zeros((3, 4), np.float32)
    voxels[1, 2] = np.nan
    voxels[0, 0] = np.inf
    write_image(tmp_path / "nan.nii.gz", voxels, Geometry.identity((3, 4)))
    with pytest.raises(ImageError, match="2 voxels are NaN or infinite"):
        read_image(tmp_path / "nan.nii.gz")
    assert read_image(tmp_path / "nan.nii.gz", require_finite=False).array.shape == (1, 3, 4)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_decompression_bomb_header_is_refused_before_allocating(tmp_path: Path) -> None:
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + _png_chunk(b"IEND", b"")
    )
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    with pytest.raises(ImageError, match="60000 x 60000") as raised:
        read_image(path, spacing_xy_mm=(1, 1))
    assert "refusing to allocate" in str(raised.value)


def test_4d_image_is_refused(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image([3, 3, 3, 2], sitk.sitkUInt8), str(tmp_path / "four.nii.gz"))
    with pytest.raises(ImageError, match="4 dimensions"):
        read_image(tmp_path / "four.nii.gz")


def test_header_info_without_voxels_matches_full_read() -> None:
    path = shared_path("hand_xray/images/3167.mha")
    info = read_image_info(path)
    image = read_image(path)
    assert info.geometry == image.geometry
    assert info.channels == 1 and info.spacing_from_file


def test_real_isbi_jpeg_is_grey_2400_by_1935() -> None:
    image = read_image(
        shared_path("isbi2015/RawImage/TrainingData/001.jpg"), spacing_xy_mm=(0.1, 0.1)
    )
    assert image.array.shape == (1, 2400, 1935)
    assert image.array.dtype == np.uint8


def test_real_afids_template_geometry() -> None:
    image = read_image(shared_path("afids_mni152/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"))
    assert image.geometry.shape == (193, 229, 193)
    np.testing.assert_allclose(image.geometry.origin_mm, (96.0, 132.0, -78.0))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_in_nifti_is_found_although_itk_zeroes_it(tmp_path: Path, suffix: str, dtype) -> None:
    voxels = np.ones((4, 5, 6), dtype)
    voxels[2, 3, 4] = np.nan
    path = tmp_path / f"nan{suffix}"
    write_image(path, voxels, Geometry.identity((4, 5, 6)))
    with pytest.raises(ImageError, match="1 voxels are NaN"):
        read_image(path)
