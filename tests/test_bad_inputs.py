"""Every bad input of the corpus (tests/bad_inputs.py) gets one clear line naming the file and
the problem, from every verb that meets it, through the real command line; never a traceback
(unless --verbose)."""

from __future__ import annotations

import csv
import json
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medlandmark.cli import main
from medlandmark.datasets.dataset import Dataset
from medlandmark.io.landmarks import write_landmarks
from medlandmark.planning import plan_dataset
from medlandmark.preprocessing import preprocess_dataset

from . import bad_inputs
from .bad_inputs import BAD_CASE, CORPUS, BadInput

ENTRIES = [pytest.param(entry, id=entry.name) for entry in CORPUS]
FILE_ENTRIES = [pytest.param(e, id=e.name) for e in CORPUS if e.kind in ("image", "landmarks")]
IMAGE_ENTRIES = [pytest.param(e, id=e.name) for e in CORPUS if e.kind == "image"]


def cli(capfd, *args: str) -> tuple[int, str]:
    """Run ``medlandmark ARGS`` in-process; the exit code and everything printed (file
    descriptors included, where ITK writes its own warnings)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse refuses an option with its usage line, exit 2
        code = stop.code
    out, err = capfd.readouterr()
    return code, out + err


def assert_clear(output: str, path: Path, needles: tuple[str, ...]) -> None:
    """One line of ``output`` names ``path`` and says every needle; no traceback, no
    last-resort "internal error", no ITK noise."""
    lines = [line.lower() for line in output.splitlines() if str(path) in line]
    said = any(all(n.lower() in line for n in needles) for line in lines)
    assert said, f"no line names {path} and says {needles}:\n{output}"
    for noise in ("Traceback", "internal error", "MetaImage:", "ITK ERROR", "WARNING: In "):
        assert noise not in output, output


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The clean dataset, planned and preprocessed: faults are added to copies of it."""
    root = bad_inputs.clean_dataset(tmp_path_factory.mktemp("prepared") / "ds")
    plan_dataset(root, workers=1)
    preprocess_dataset(root, workers=1)
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A briefly trained 2D U-Net (1 mm pixels) to predict with."""
    from medlandmark.training.loop import TrainOptions, train

    from .conftest import synthetic_training_set

    folder = tmp_path_factory.mktemp("trained")
    dataset = synthetic_training_set(folder / "ds", num_cases=4, size_px=32)
    train(dataset, folder / "run", TrainOptions(epochs=1, iterations_per_epoch=2, fold="all"))
    return folder / "run"


def _with_fault(prepared: Path, entry: BadInput, folder: Path) -> Path:
    root = folder / entry.name
    shutil.copytree(prepared, root)
    entry.make(root)
    return root


# --- check -----------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_check_names_the_file_and_the_problem(entry: BadInput, tmp_path: Path, capfd) -> None:
    root = entry.build(tmp_path / entry.name)
    code, output = cli(capfd, "check", root)
    assert code == 1, output
    assert_clear(output, root / entry.offending, ("error:", *entry.needles))
    assert ": 1 error, 0 warnings" in output  # the fault, and nothing else, fails the check


# --- plan, preprocess, train -----------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_plan_refuses_a_dataset_with_the_fault(entry: BadInput, tmp_path: Path, capfd) -> None:
    root = entry.build(tmp_path / entry.name)
    code, output = cli(capfd, "plan", root, "--workers", "1")
    assert code == 2, output
    assert_clear(output, root / entry.offending, ("error:", *entry.needles))
    assert not (root / "preprocessed" / "plans.json").exists()


@pytest.mark.parametrize("entry", FILE_ENTRIES)
def test_preprocess_refuses_a_file_added_after_planning(
    entry: BadInput, prepared: Path, tmp_path: Path, capfd
) -> None:
    root = _with_fault(prepared, entry, tmp_path)
    code, output = cli(capfd, "preprocess", root, "--workers", "1")
    assert code == 2, output
    assert_clear(output, root / entry.offending, ("error:", *entry.needles))
    assert not list((root / "preprocessed").glob(f"*/{BAD_CASE}.json"))


def test_preprocess_in_worker_processes_names_the_file_too(
    prepared: Path, tmp_path: Path, capfd
) -> None:
    root = _with_fault(prepared, bad_inputs.CORPUS_BY_NAME["nan_voxels"], tmp_path)
    for cached in (root / "preprocessed").glob("*/case00*.json"):
        cached.unlink()  # every case is redone, in two processes
    code, output = cli(capfd, "preprocess", root, "--workers", "2")
    assert code == 2, output
    assert_clear(output, root / "images" / f"{BAD_CASE}.nii.gz", ("NaN or infinite",))


@pytest.mark.parametrize("entry", ENTRIES)
def test_train_after_the_fault_arrives_says_what_to_do(
    entry: BadInput, prepared: Path, tmp_path: Path, capfd
) -> None:
    """A bad case added to a prepared dataset is not in the cache (preprocess then names the
    file); a broken dataset.json, splits.json or folder is named by train itself."""
    root = _with_fault(prepared, entry, tmp_path)
    code, output = cli(
        capfd,
        "train",
        root,
        "-o",
        tmp_path / "run",
        "--fold",
        "all",
        "--epochs",
        "1",
        "--iterations",
        "1",
        "--device",
        "cpu",
    )
    assert code == 2, output
    if entry.kind == "dataset":
        assert_clear(output, root / entry.offending, ("error:", *entry.needles))
    else:
        cache = next(p for p in (root / "preprocessed").iterdir() if p.is_dir())
        assert_clear(
            output, cache, (f"case '{BAD_CASE}' is not in the cache", "medlandmark preprocess")
        )


@pytest.mark.parametrize(
    "damage", ["truncated_npy", "missing_npy", "invalid_json", "json_without_keys"]
)
def test_train_on_a_damaged_cache_names_the_cached_case(
    damage: str, prepared: Path, tmp_path: Path, capfd
) -> None:
    root = tmp_path / "ds"
    shutil.copytree(prepared, root)
    cache = next(p for p in (root / "preprocessed").iterdir() if p.is_dir())
    npy, meta = cache / "case001.npy", cache / "case001.json"
    if damage == "truncated_npy":
        npy.write_bytes(npy.read_bytes()[:200])
    elif damage == "missing_npy":
        npy.unlink()
    elif damage == "invalid_json":
        meta.write_text('{"version": 1, "case_id": "case0')
    else:
        meta.write_text(json.dumps({"version": 1}))
    code, output = cli(
        capfd, "train", root, "-o", tmp_path / "run", "--fold", "all", "--epochs", "1"
    )
    assert code == 2, output
    assert_clear(output, meta, ("cached case 'case001' is damaged", "preprocess"))
    assert not (tmp_path / "run").exists()


# --- predict ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", IMAGE_ENTRIES)
def test_predict_fails_the_bad_image_alone(
    entry: BadInput, trained_run: Path, tmp_path: Path, capfd
) -> None:
    root = entry.build(tmp_path / entry.name)
    image, good, out = root / entry.offending, root / "images" / "case000.png", tmp_path / "out"
    code, output = cli(capfd, "predict", trained_run, image, good, "-o", out)
    assert code == 1, output
    assert_clear(output, image, entry.needles)
    rows = {row["case_id"]: row for row in csv.DictReader((out / "summary.csv").open())}
    assert rows["case000"]["status"] == "ok" and rows[BAD_CASE]["status"] == "failed"
    assert_clear(rows[BAD_CASE]["message"], image, entry.needles)
    assert sorted(p.name for p in out.iterdir()) == ["case000.json", "summary.csv"]


def test_predict_on_an_empty_dataset_names_the_folder(
    trained_run: Path, tmp_path: Path, capfd
) -> None:
    root = bad_inputs.CORPUS_BY_NAME["empty_dataset"].build(tmp_path / "empty")
    code, output = cli(capfd, "predict", trained_run, root, "-o", tmp_path / "out")
    assert code == 2, output
    assert_clear(output, root / "images", ("holds no images",))


def test_predict_refuses_a_nan_spacing_option(trained_run: Path, tmp_path: Path, capfd) -> None:
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "predict",
                str(trained_run),
                str(tmp_path / "x.png"),
                "-o",
                str(tmp_path / "o"),
                "--spacing",
                "nan",
            ]
        )
    assert exited.value.code == 2
    assert "--spacing: must be a positive finite number, got nan" in capfd.readouterr().err


# --- decompression bomb, --verbose, the last resort --------------------------------------------


def test_decompression_bomb_is_refused_before_any_pixel_is_read(
    tmp_path: Path, capfd, monkeypatch
) -> None:
    root = bad_inputs.CORPUS_BY_NAME["decompression_bomb"].build(tmp_path / "bomb")
    bomb = root / "images" / f"{BAD_CASE}.png"
    read_image, execute = sitk.ReadImage, sitk.ImageFileReader.Execute

    def read_other_images(path, *args, **kwargs):
        assert Path(path) != bomb, "the bomb's pixels were decoded"
        return read_image(path, *args, **kwargs)

    def execute_for_other_images(reader):
        assert Path(reader.GetFileName()) != bomb, "the bomb's pixels were decoded"
        return execute(reader)

    monkeypatch.setattr(sitk, "ReadImage", read_other_images)
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", execute_for_other_images)
    peak_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, output = cli(capfd, "check", root)
    assert code == 1
    assert_clear(output, bomb, ("60000 x 60000", "refusing to allocate"))
    assert (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kb < 500_000
    )  # 3.6 GB if decoded


def test_verbose_shows_the_traceback(tmp_path: Path, capfd) -> None:
    root = bad_inputs.CORPUS_BY_NAME["truncated_png"].build(tmp_path / "ds")
    code, output = cli(capfd, "plan", root, "--workers", "1", "--verbose")
    assert code == 2
    assert "Traceback" in output and "ImageError" in output
    assert f"{root / 'images' / 'bad.png'}: image file is truncated" in output


def test_an_unexpected_exception_is_one_line_naming_the_verb(
    tmp_path: Path, capfd, monkeypatch
) -> None:
    import medlandmark.datasets.check as check

    def broken(root):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(check, "check_dataset", broken)
    code, output = cli(capfd, "check", tmp_path)
    assert code == 2
    assert "internal error in 'check': ZeroDivisionError: a bug (run again with --verbose" in output
    assert "Traceback" not in output
    code, output = cli(capfd, "check", tmp_path, "--verbose")
    assert code == 2 and "Traceback" in output and "ZeroDivisionError" in output


# --- Slicer files in LPS and in RAS ------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mrk.json", ".fcsv"])
def test_slicer_files_in_lps_and_ras_give_the_same_points(
    suffix: str, tmp_path: Path, capfd
) -> None:
    root = bad_inputs.clean_dataset(tmp_path / "ds")
    truth = {}
    for case_id, space in (("case000", "LPS"), ("case001", "RAS")):
        landmarks = Dataset(root).read_landmarks(case_id)
        (root / "landmarks" / f"{case_id}.csv").unlink()
        write_landmarks(root / "landmarks" / f"{case_id}{suffix}", landmarks, space=space)
        truth[case_id] = landmarks.points_mm
    text = (root / "landmarks" / f"case001{suffix}").read_text()
    assert ("RAS" in text or "CoordinateSystem = 0" in text) and "LPS" not in text
    code, output = cli(capfd, "check", root)
    assert code == 0, output
    for case_id, points_mm in truth.items():
        np.testing.assert_allclose(
            Dataset(root).read_landmarks(case_id).points_mm, points_mm, atol=1e-9
        )


# --- convert ----------------------------------------------------------------------------------


def _assert_nothing_converted(out: Path) -> None:
    assert not (out / "dataset.json").exists()


def test_convert_isbi_truncated_jpeg(tmp_path: Path, capfd) -> None:
    src = bad_inputs.isbi_source(tmp_path / "src")
    jpeg = src / "RawImage" / "TrainingData" / "002.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    code, output = cli(capfd, "convert", "isbi2015", src, tmp_path / "out")
    assert code == 2
    assert_clear(output, jpeg, ("truncated",))
    _assert_nothing_converted(tmp_path / "out")


@pytest.mark.parametrize(
    ("line", "needles"),
    [("12,abc", ("line 4: 'abc' is not a number",)), (None, ("holds 17 landmarks, expected 19",))],
)
def test_convert_isbi_bad_annotation(
    line: str | None, needles: tuple[str, ...], tmp_path: Path, capfd
) -> None:
    src = bad_inputs.isbi_source(tmp_path / "src")
    annotation = src / "AnnotationsByMD" / "400_junior" / "001.txt"
    lines = annotation.read_text().splitlines()
    lines = lines[:3] + [line] + lines[4:] if line else lines[:17]
    annotation.write_text("\n".join(lines) + "\n")
    code, output = cli(capfd, "convert", "isbi2015", src, tmp_path / "out")
    assert code == 2
    assert_clear(output, annotation, needles)
    _assert_nothing_converted(tmp_path / "out")


def test_convert_isbi_clean_source_works(tmp_path: Path, capfd) -> None:
    """The fake source is valid: each fault above is the only reason for its failure."""
    src = bad_inputs.isbi_source(tmp_path / "src")
    code, output = cli(capfd, "convert", "isbi2015", src, tmp_path / "out")
    assert code == 0, output
    assert cli(capfd, "check", tmp_path / "out")[0] == 0


def test_convert_hand_truncated_mha_and_text_in_the_table(tmp_path: Path, capfd) -> None:
    src = bad_inputs.hand_source(tmp_path / "src")
    assert cli(capfd, "convert", "hand-xray", src, tmp_path / "clean")[0] == 0
    table = src / "landmarks_px.csv"
    table.write_text(table.read_text().replace(",3,4,", ",3,four,", 1))
    code, output = cli(capfd, "convert", "hand-xray", src, tmp_path / "out")
    assert code == 2
    assert_clear(output, table, ("row 2: 'four' is not a number",))
    bad_inputs.hand_source(src)
    image = src / "images" / "3002.mha"
    image.write_bytes(image.read_bytes()[:-100])
    code, output = cli(capfd, "convert", "hand-xray", src, tmp_path / "out")
    assert code == 2
    assert_clear(output, image, ("truncated",))
    _assert_nothing_converted(tmp_path / "out")


@pytest.mark.parametrize(
    ("old", "new", "needles"),
    [
        ("_2,-4,-5,6,", "_2,-4,minus five,6,", ("point 2: 'minus five' is not a number",)),
        (
            "_2,-4,-5,6,0,0,0,1,1,1,0,2,,",
            "_2,-4,-5,6,0,0,0,1,1,1,0",
            ("point 2 has 11 fields, expected 14",),
        ),
        ("# columns = id,x,y,z,", "# columns = id,x,y,", ("'# columns' lacks 'z'",)),
    ],
)
def test_convert_afids_bad_fcsv(
    old: str, new: str, needles: tuple[str, ...], tmp_path: Path, capfd
) -> None:
    image, fcsv = bad_inputs.afids_source(tmp_path / "src")
    text = fcsv.read_text()
    assert old in text
    fcsv.write_text(text.replace(old, new, 1))
    code, output = cli(capfd, "convert", "afids", image, fcsv, tmp_path / "out")
    assert code == 2
    assert_clear(output, fcsv, needles)
    assert not (tmp_path / "out").exists()


def test_convert_afids_refuses_a_case_id_that_escapes_the_dataset(tmp_path: Path, capfd) -> None:
    image, fcsv = bad_inputs.afids_source(tmp_path / "src")
    before = sorted(tmp_path.rglob("*"))
    code, output = cli(
        capfd, "convert", "afids", image, fcsv, tmp_path / "out" / "ds", "--case-id", "../escape"
    )
    assert code == 2
    assert_clear(output, image, ("invalid case id '../escape'",))
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, inside or outside
    assert cli(capfd, "convert", "afids", image, fcsv, tmp_path / "out" / "ds")[0] == 0


# --- bad command lines -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [pytest.param(c, id=c.name) for c in bad_inputs.COMMANDS])
def test_a_bad_command_gets_one_clear_line_and_its_exit_code(
    command: bad_inputs.BadCommand, prepared: Path, trained_run: Path, tmp_path: Path, capfd
) -> None:
    """Every bad option, run folder or output of the corpus: the asserted exit code, one line
    saying every needle (naming the file when there is one), no traceback, nothing written for
    a refused training."""
    place = bad_inputs.Place(prepared, tmp_path / "run", tmp_path / "work")
    shutil.copytree(trained_run, place.run)
    place.work.mkdir()
    argv = command.argv(place)
    code, output = cli(capfd, *argv)
    assert code == command.exit_code, output
    named = command.named(place) if command.named else None
    if named is not None:  # a failed image of predict is a warning; the others fail as errors
        prefix = ("error:",) if command.exit_code == 2 else ("warning:",)
        assert_clear(output, named, (*prefix, *command.needles))
    else:
        errors = [line.lower() for line in output.splitlines() if "error" in line.lower()]
        said = any(all(n.lower() in line for n in command.needles) for line in errors)
        assert said, output
        assert "Traceback" not in output and "internal error" not in output, output
    assert not (place.work / "run" / "run.json").exists()
    assert "pwned" not in output
