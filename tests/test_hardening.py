"""Weak answers made clear: file signatures, NIfTI transforms, tiny images, output folders, file
modes, weights that do not fit, pickles, option forms, confidences (issue 18, round two)."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medlandmark import console
from medlandmark.cli import main
from medlandmark.errors import ImageError, MedlandmarkError, validation_problems
from medlandmark.heatmaps import confidence_of
from medlandmark.io.files import atomic_write_text
from medlandmark.io.geometry import Geometry
from medlandmark.io.images import read_image, read_image_info, write_image
from medlandmark.io.nifti import read_nifti_transforms, transforms_disagreement_mm
from medlandmark.records.weights import CheckpointError, load_checkpoint, load_weights, save_weights

NIFTI_SROW_X_OFFSET = 280 + 12  # srow_x[3]: the sform's x translation


def _nifti(tmp_path: Path, name: str = "a.nii") -> Path:
    path = tmp_path / name
    write_image(
        path,
        np.arange(6 * 5 * 4, dtype=np.float32).reshape(4, 5, 6),
        Geometry.identity((4, 5, 6), (1.0, 2.0, 3.0)),
    )
    return path


def test_a_nifti_whose_qform_and_sform_disagree_is_named_once(tmp_path: Path, capfd) -> None:
    console.configure(quiet=False)
    path = _nifti(tmp_path)
    transforms = read_nifti_transforms(path)
    assert transforms is not None and transforms_disagreement_mm(transforms) < 1e-3
    header = bytearray(path.read_bytes())
    shift = struct.unpack_from("<f", header, NIFTI_SROW_X_OFFSET)[0]
    struct.pack_into("<f", header, NIFTI_SROW_X_OFFSET, shift + 57.0)
    path.write_bytes(bytes(header))
    assert transforms_disagreement_mm(read_nifti_transforms(path)) == pytest.approx(57.0, abs=1e-3)
    read_image_info(path)
    read_image(path)
    err = capfd.readouterr().err
    assert err.count("qform and sform disagree") == 1, err
    assert str(path) in err and "57.0 mm" in err and "sform was used" in err


def test_a_half_turn_direction_reads_as_itk_reads_it(tmp_path: Path, capfd) -> None:
    """A half turn's qform quaternion in float32 has a^2 of about 4e-8; read as nifti1_io does
    (a = 0), the qform agrees with the sform and nothing is said."""
    console.configure(quiet=False)
    geometry = Geometry.from_itk(
        (3.0, 1.0, 1.0), (-102.0, -110.0, -108.0), (1, 0, 0, 0, 0, 1, 0, 1, 0), (20, 60, 60)
    )
    path = tmp_path / "half-turn.nii.gz"
    write_image(path, np.zeros(geometry.shape, dtype=np.int16), geometry)
    assert transforms_disagreement_mm(read_nifti_transforms(path)) < 1e-3
    read_image_info(path)
    assert "disagree" not in capfd.readouterr().err


def test_a_clean_nifti_reads_without_a_word(tmp_path: Path, capfd) -> None:
    console.configure(quiet=False)
    read_image(_nifti(tmp_path, "clean.nii.gz"))
    assert "disagree" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("written", "named", "needle"),
    [
        (".jpg", ".png", "is a JPEG image but is named .png: rename it to .jpg"),
        (".png", ".jpg", "is a PNG image but is named .jpg: rename it to .png"),
        (".bmp", ".tif", "is a BMP image but is named .tif: rename it to .bmp"),
        (".png", ".bmp", "is a PNG image but is named .bmp"),
    ],
)
def test_an_image_under_another_formats_name_is_named_as_such(
    tmp_path: Path, written: str, named: str, needle: str
) -> None:
    source = tmp_path / f"a{written}"
    write_image(source, np.full((8, 8), 9, np.uint8), Geometry.identity((8, 8)))
    path = source.rename(tmp_path / f"b{named}")
    with pytest.raises(ImageError, match=needle) as raised:
        read_image(path, spacing_xy_mm=(1, 1))
    assert raised.value.path == path


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1)])
def test_an_image_too_small_for_a_landmark_is_refused(tmp_path: Path, shape) -> None:
    path = tmp_path / "tiny.png"
    write_image(path, np.zeros(shape, np.uint8), Geometry.identity(shape))
    with pytest.raises(ImageError, match="too small to hold landmarks"):
        read_image_info(path, spacing_xy_mm=(1, 1))


def test_a_read_only_folder_is_named_not_the_temporary_file(tmp_path: Path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".x.partial-1"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    target = tmp_path / "out" / "x.json"
    with pytest.raises(PermissionError) as raised:
        atomic_write_text(target, "{}")
    assert raised.value.filename == str(target) and "partial" not in str(raised.value)
    assert "cannot write here" in str(raised.value)


def test_an_output_path_under_a_file_says_so(tmp_path: Path, capfd) -> None:
    (tmp_path / "out").write_text("a file")
    with pytest.raises(NotADirectoryError) as raised:
        atomic_write_text(tmp_path / "out" / "deeper" / "x.json", "{}")
    assert raised.value.filename == str(tmp_path / "out")
    assert "is a file, not a folder" in str(raised.value)


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "x.json", "{}")
    mode = stat.S_IMODE((tmp_path / "x.json").stat().st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask and mode & stat.S_IRGRP  # colleagues may read (umask 022)


def test_weights_that_do_not_fit_say_how(tmp_path: Path) -> None:
    saved = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 2, 1))
    save_weights(tmp_path / "w.safetensors", saved)
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 2, 1), torch.nn.ReLU())
    with pytest.raises(CheckpointError) as raised:
        load_weights(tmp_path / "w.safetensors", other)
    message = str(raised.value)
    assert "3 of other shapes, e.g. 0.weight: 4 x 1 x 3 x 3 in the file, 8 x 1 x 3 x 3" in message
    assert "Error(s) in loading" not in message and "another plan or architecture" in message


def test_a_pickle_is_refused_without_torchs_advice(tmp_path: Path) -> None:
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "checkpoint_latest.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert "could run code" in message and "the loader stopped at: Unsupported" in message
    assert "weights_only" not in message and "two options" not in message


def test_radii_may_be_given_as_words_or_with_commas(tmp_path: Path, capfd) -> None:
    from .bad_inputs import clean_dataset

    root = clean_dataset(tmp_path / "ds")
    for radii in (["1", "2", "5"], ["1,2,5"], ["1,2", "5"]):
        out = tmp_path / "eval" / "-".join(radii)
        code = main(
            [
                "evaluate",
                "--pred",
                str(root / "landmarks"),
                "--gt",
                str(root),
                "--out",
                str(out),
                "--radii",
                *radii,
            ]
        )
        assert code == 0, capfd.readouterr()
        assert len(json.loads((out / "metrics.json").read_text())["sdr"]) == 3


def test_a_number_written_as_text_gets_a_hint() -> None:
    from pydantic import ValidationError

    from medlandmark.datasets.dataset import DatasetSpec

    with pytest.raises(ValidationError) as raised:
        DatasetSpec.model_validate({"name": "x", "spatial_dims": "2", "landmarks": ["a"]})
    assert 'got the text "2": write the number without quotes' in validation_problems(
        raised.value, "spec"
    )


def test_confidence_is_the_peak_on_the_targets_scale_clipped() -> None:
    np.testing.assert_allclose(confidence_of(np.array([-0.1, 0.5, 1.67])), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(
        confidence_of(np.array([-1.0, 0.5, 2.0, 3.0]), "radius_bump"), [0.0, 0.5, 1.0, 1.0]
    )


def test_errors_are_medlandmark_errors_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "text.png"
    path.write_text("not an image")
    with pytest.raises(MedlandmarkError) as raised:
        read_image_info(path)
    assert raised.value.path == path and "not a PNG file" in str(raised.value)
