"""SIGKILL during preprocess, train and predict: no half-written file is ever taken as complete,
and rerunning finishes with exactly the results of an uninterrupted run.

Each process is killed in two ways: at a seeded random moment once progress is visible, and by
itself just before the atomic rename of a chosen output (the worst moment: the new file is
complete under its temporary name, the old name not yet replaced).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medlandmark.errors import MedlandmarkError
from medlandmark.evaluation import prediction_files
from medlandmark.inference.batch import predict_files
from medlandmark.io.landmarks import read_landmarks
from medlandmark.planning import plan_dataset
from medlandmark.preprocessing import load_cached_case, preprocess_dataset
from medlandmark.records.weights import load_checkpoint
from medlandmark.training.loop import TrainOptions, train

from .conftest import shrink_networks

# argv: MODE VALUE CLI-ARGS...; "slow" sleeps VALUE s before reading each image (preprocess,
# predict), "die-before" SIGKILLs the process itself before the N-th rename onto NAME (VALUE
# "NAME:N"), "plain" runs the command as it is
DRIVER = """
import os, signal, sys, time
mode, value, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "die-before":
    name, occurrence = value.rsplit(":", 1)
    original, seen = os.replace, [0]
    def replace(source, target, *args, **kwargs):
        if os.path.basename(os.fspath(target)) == name:
            seen[0] += 1
            if seen[0] == int(occurrence):
                os.kill(os.getpid(), signal.SIGKILL)
        return original(source, target, *args, **kwargs)
    os.replace = replace
elif mode == "slow":
    module = __import__({"preprocess": "medlandmark.preprocessing", "predict": "medlandmark.inference.batch"}[argv[0]], fromlist=["x"])
    read = module.read_image
    def slowed(*args, **kwargs):
        time.sleep(float(value))
        return read(*args, **kwargs)
    module.read_image = slowed
from medlandmark.cli import main
sys.exit(main(argv))
"""
TRAIN_ARGS = [
    "--epochs",
    "3",
    "--iterations",
    "4",
    "--validate-every",
    "1",
    "--fold",
    "0",
    "--deterministic",
    "--seed",
    "5",
]
TRAIN_OPTIONS = {
    "epochs": 3,
    "iterations_per_epoch": 4,
    "validate_every": 1,
    "fold": 0,
    "deterministic": True,
    "seed": 5,
}
CASES = 8
SLOW_S = 0.15


def _start(mode: str, value: str, argv: list[str], log: Path) -> subprocess.Popen:
    """The CLI in a child process with as many threads as this one (the same arithmetic)."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, mode, value, *argv],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=environment,
    )


def _wait_for(process: subprocess.Popen, log: Path, condition, timeout_s: float = 120) -> float:
    """The time at which ``condition()`` became true, while ``process`` was still working."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, (
            f"finished before it could be interrupted:\n{log.read_text()}"
        )
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.005)
    return time.monotonic()


def _killed(
    process: subprocess.Popen, log: Path, ready=None, delay_s: float = 0.0, timeout_s: float = 120
) -> None:
    """SIGKILL ``process`` ``delay_s`` after ``ready()`` (or wait for it to kill itself); it must
    still have been working."""
    if ready is not None:
        _wait_for(process, log, ready, timeout_s)
        time.sleep(delay_s)
        assert process.poll() is None, (
            f"finished before it could be interrupted:\n{log.read_text()}"
        )
        process.kill()
    process.wait(timeout=timeout_s)
    assert process.returncode == -signal.SIGKILL, log.read_text()


def _final_files(folder: Path) -> dict[str, Path]:
    """Files under their final names (leftover temporary files are hidden ``.x.partial-*``)."""
    files = {p.name: p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert all(".partial-" in p.name for p in folder.iterdir() if p.name.startswith(".")), sorted(
        folder.iterdir()
    )
    return files


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


# ---------------------------------------------------------------- preprocess


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic 2D dataset, planned, and its uninterrupted cache (in ``reference/``)."""
    from medlandmark.datasets.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("interrupt") / "ds", num_cases=CASES, size_px=40, spacing_mm=1.0
    )
    plan_dataset(root, gpu_memory_gb=2.0)
    reference = root / "reference"
    reference.mkdir()
    shutil.copy(root / "preprocessed" / "plans.json", reference)
    preprocess_dataset(root, reference, workers=1)
    return root, reference


def _cache(preprocessed: Path) -> Path:
    (folder,) = [p for p in preprocessed.iterdir() if p.is_dir()]
    return folder


def _assert_cache_trustworthy(folder: Path, reference: Path) -> None:
    """Each case with its marker is complete (equal to the uninterrupted one); voxels without
    a marker are not in the cache."""
    files = _final_files(folder)
    for name in files:
        case_id, suffix = name.rsplit(".", 1)
        if suffix == "json":
            np.asarray(load_cached_case(folder, case_id).image)  # loads whole
            assert (folder / f"{case_id}.npy").read_bytes() == (
                reference / f"{case_id}.npy"
            ).read_bytes()
        elif f"{case_id}.json" not in files:
            with pytest.raises(MedlandmarkError, match="not in the cache"):
                load_cached_case(folder, case_id)


@pytest.mark.parametrize("kill", ["die-before case003.json:1", "seed 0", "seed 1"])
def test_preprocess_killed_then_rerun_writes_the_same_cache(
    planned, tmp_path: Path, kill: str
) -> None:
    root, reference = planned
    target = tmp_path / "preprocessed"
    target.mkdir()
    shutil.copy(reference / "plans.json", target)
    argv = ["preprocess", str(root), "--preprocessed", str(target), "--workers", "1"]
    log = tmp_path / "log.txt"
    if kill.startswith("die-before"):
        _killed(_start("die-before", kill.split()[1], argv, log), log)
    else:
        rng = np.random.default_rng(int(kill.split()[1]))
        markers = int(rng.integers(1, CASES - 2))

        def ready() -> bool:
            return (
                len([p for p in target.glob("*/*.json") if not p.name.startswith(".")]) >= markers
            )

        _killed(_start("slow", str(SLOW_S), argv, log), log, ready, rng.uniform(0, SLOW_S))
    folder, expected = _cache(target), _cache(reference)
    _assert_cache_trustworthy(folder, expected)
    if kill.startswith("die-before"):
        assert (folder / "case003.npy").is_file() and not (folder / "case003.json").exists()
        assert _partials(folder), "the unrenamed marker should be left as a hidden partial file"
    complete = len([p for p in folder.glob("*.json") if not p.name.startswith(".")])
    counts = preprocess_dataset(root, target, workers=1)
    assert counts[folder.name] == {"done": CASES - complete, "skipped": complete}
    assert sorted(_final_files(folder)) == sorted(_final_files(expected))
    for name, path in _final_files(expected).items():
        assert (folder / name).read_bytes() == path.read_bytes(), name
    assert not _partials(folder), "a rerun removes what the killed run left of the cases it redoes"


# ---------------------------------------------------------------- train


@pytest.fixture(scope="module")
def trainable(planned, tmp_path_factory) -> tuple[Path, Path]:
    """The dataset with narrow networks and its cache, and an uninterrupted reference run."""
    source, _ = planned
    root = tmp_path_factory.mktemp("train") / "ds"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("reference"))
    shrink_networks(root)
    preprocess_dataset(root, workers=1)
    reference = root.parent / "reference_run"
    record = train(root, reference, TrainOptions(**TRAIN_OPTIONS))
    assert record.status == "finished" and record.step == 12
    return root, reference


def _assert_run_files_complete(run: Path) -> None:
    """Everything under a final name reads back whole."""
    for name, path in _final_files(run).items():
        if name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".pt"):
            assert load_checkpoint(path)["step"] % 4 == 0
        elif name.endswith(".safetensors"):
            assert load_file(str(path))
        elif name.endswith(".csv"):
            assert all(len(row) == 8 for row in csv.reader(path.open()))


def _log_rows(run: Path) -> list[dict]:
    keep = ("epoch", "step", "train_loss", "learning_rate", "val_mre_mm", "val_sdr_2mm")
    return [{k: row[k] for k in keep} for row in csv.DictReader((run / "log.csv").open())]


@pytest.mark.parametrize(
    "kill",
    [
        "die-before checkpoint_latest.pt:1",
        "die-before checkpoint_latest.pt:2",
        "die-before log.csv:2",
        "seed 2",
    ],
)
def test_training_killed_then_resumed_equals_an_uninterrupted_run(
    trainable, tmp_path: Path, kill: str
) -> None:
    root, reference = trainable
    run = tmp_path / "run"
    argv = ["train", str(root), "-o", str(run), *TRAIN_ARGS]
    log = tmp_path / "log.txt"
    if kill.startswith("die-before"):
        _killed(_start("die-before", kill.split()[1], argv, log), log)
        assert _partials(run), "the file being renamed should be left as a hidden partial file"
    else:
        rng = np.random.default_rng(int(kill.split()[1]))
        process = _start("plain", "", argv, log)
        started = _wait_for(process, log, (run / "run.json").is_file)
        first_epoch_s = _wait_for(process, log, (run / "checkpoint_latest.pt").is_file) - started
        _killed(process, log, lambda: True, rng.uniform(0, 1) * first_epoch_s)  # two epochs remain
    _assert_run_files_complete(run)
    record = train(root, run, TrainOptions(**TRAIN_OPTIONS), resume=True)
    assert record.status == "finished" and record.step == 12
    assert not _partials(run), "resume removes what the killed run left"
    for name in ("model_final.safetensors", "model_best.safetensors"):
        resumed, uninterrupted = load_file(str(run / name)), load_file(str(reference / name))
        assert resumed.keys() == uninterrupted.keys()
        for key, tensor in uninterrupted.items():
            assert torch.equal(resumed[key], tensor), (name, key)
    assert load_checkpoint(run / "checkpoint_latest.pt")["step"] == 12
    expected = json.loads((reference / "run.json").read_text())
    assert (
        record.best.model_dump() == expected["best"]
        and record.presence_threshold == expected["presence_threshold"]
    )
    assert _log_rows(run) == _log_rows(reference)


# ---------------------------------------------------------------- predict


def _predictions(folder: Path) -> dict[str, np.ndarray]:
    """What ``evaluate`` would read from ``folder``."""
    return {case: read_landmarks(path).points_mm for case, path in prediction_files(folder).items()}


@pytest.mark.parametrize("kill", ["die-before case004.json:1", "seed 3"])
def test_prediction_killed_then_rerun_gives_the_same_landmarks(
    trainable, tmp_path: Path, kill: str
) -> None:
    root, run = trainable
    images = sorted((root / "images").iterdir())
    expected_rows = predict_files(run, images, tmp_path / "reference")
    expected = _predictions(tmp_path / "reference")
    out = tmp_path / "out"
    argv = ["predict", str(run), *map(str, images), "-o", str(out), "--format", "json"]
    log = tmp_path / "log.txt"
    if kill.startswith("die-before"):
        _killed(_start("die-before", kill.split()[1], argv, log), log)
        assert _partials(out), (
            "the prediction being renamed should be left as a hidden partial file"
        )
    else:
        rng = np.random.default_rng(int(kill.split()[1]))
        written = int(rng.integers(1, CASES - 3))

        def ready() -> bool:
            written_now = [p for p in out.glob("*.json") if not p.name.startswith(".")]
            return out.is_dir() and len(written_now) >= written

        _killed(_start("slow", str(SLOW_S), argv, log), log, ready, rng.uniform(0, SLOW_S))
    assert "summary.csv" not in _final_files(out)
    found = _predictions(out)  # hidden partial files are not predictions
    assert 0 < len(found) < len(images)
    for case, points in found.items():  # every file there is whole
        np.testing.assert_allclose(points, expected[case], atol=1e-6, rtol=0)
    rows = predict_files(run, images, out)
    assert [r["status"] for r in rows] == ["ok"] * len(images)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in expected_rows
    ]
    again = _predictions(out)
    assert again.keys() == expected.keys()
    for case, points in expected.items():
        np.testing.assert_allclose(again[case], points, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- check and plan: Ctrl-C

# argv: MARKER SLOW_S CLI-ARGS...; every case of check and of plan's fingerprint first touches
# MARKER, then sleeps SLOW_S (a slow disk), then is read as usual
SLOW_CASES_DRIVER = """
import sys, time
from pathlib import Path
marker, slow_s, argv = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
import medlandmark.datasets.check as check
import medlandmark.planning.fingerprint as fingerprint
def slowed(function):
    def run(*args, **kwargs):
        marker.touch()
        time.sleep(slow_s)
        return function(*args, **kwargs)
    return run
check.case_problems = slowed(check.case_problems)
fingerprint._case_fingerprint = slowed(fingerprint._case_fingerprint)
from medlandmark.cli import main
sys.exit(main(argv))
"""
INTERRUPT_WITHIN_S = 2.0


@pytest.mark.parametrize("verb", ["check", "plan"])
def test_ctrl_c_stops_check_and_plan_within_two_seconds(
    verb: str, planned: tuple[Path, Path], tmp_path: Path
) -> None:
    """With 8 cases of 1 s each on at most 4 threads (2 s of reading or more), SIGINT once the first
    case has started ends the process within 2 s, exit 130, saying so, and plan writes no plan."""
    root = tmp_path / "ds"
    shutil.copytree(planned[0], root, ignore=shutil.ignore_patterns("preprocessed", "reference"))
    marker, log = tmp_path / "started", tmp_path / "log.txt"
    argv = [verb, str(root)] + (["--workers", "4"] if verb == "plan" else [])
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_CASES_DRIVER, str(marker), "1.0", *argv],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    _wait_for(process, log, marker.exists)
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    took = time.monotonic() - interrupted
    assert process.returncode == 130, log.read_text()
    assert took < INTERRUPT_WITHIN_S, f"{took:.1f} s after SIGINT:\n{log.read_text()}"
    assert "interrupted" in log.read_text()
    assert not (root / "preprocessed" / "plans.json").exists()
