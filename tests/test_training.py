"""Training engine end to end on small data: loss falls, resume is exact, signals, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medlandmark.records.plan import load_plan
from medlandmark.records.weights import load_checkpoint
from medlandmark.training.loop import TrainOptions, train

from .conftest import synthetic_training_set

SMALL_FEATURES = 8


def _log_losses(run: Path) -> list[float]:
    import csv

    return [float(row["train_loss"]) for row in csv.DictReader((run / "log.csv").open())]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return synthetic_training_set(tmp_path_factory.mktemp("train") / "ds", num_cases=10, size_px=48)


def test_training_writes_a_complete_run_and_the_loss_falls(synthetic: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    record = train(
        synthetic, run, TrainOptions(epochs=4, iterations_per_epoch=10, validate_every=2, seed=1)
    )
    assert record.status == "finished" and record.step == 40
    for name in (
        "run.json",
        "checkpoint_latest.pt",
        "model_best.safetensors",
        "model_final.safetensors",
        "log.csv",
        "training_curve.png",
    ):
        assert (run / name).is_file(), name
    losses = _log_losses(run)
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    saved = json.loads((run / "run.json").read_text())
    assert saved["best"]["val_mre_mm"] > 0 and 0 < saved["presence_threshold"] < 1
    assert saved["error_bound_level"] == 0.9 and len(saved["error_bounds_mm"]) == 9
    assert all(b > 0 for b in saved["error_bounds_mm"])  # conformal radii of validation errors
    assert set(saved["val_cases"]).isdisjoint(saved["train_cases"])
    shape = saved["shape_model"]  # the training landmarks' constellation, for the shape check
    assert (
        len(shape["reference_mm"]) == 9
        and shape["inlier_mm"] > 0
        and 0 < shape["singular_values"][0] < 1 < shape["singular_values"][1]
    )


def test_resume_after_a_stop_equals_an_uninterrupted_run(synthetic: Path, tmp_path: Path) -> None:
    options = {
        "epochs": 2,
        "iterations_per_epoch": 5,
        "validate_every": 1,
        "deterministic": True,
        "seed": 3,
    }
    whole = train(synthetic, tmp_path / "whole", TrainOptions(**options))
    first = train(synthetic, tmp_path / "split", TrainOptions(**options, max_steps=5))
    assert first.status == "stopped" and first.step == 5
    second = train(synthetic, tmp_path / "split", TrainOptions(**options), resume=True)
    assert whole.step == second.step == 10
    a = load_checkpoint(tmp_path / "whole" / "checkpoint_latest.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoint_latest.pt")["model"]
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-6, rtol=0), name


def test_sigterm_saves_a_checkpoint_and_resume_continues(synthetic: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "medlandmark",
        "train",
        str(synthetic),
        "-o",
        str(run),
        "--epochs",
        "40",
        "--iterations",
        "3",
        "--fold",
        "all",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while (
        not (run / "log.csv").is_file() and time.monotonic() < deadline and process.poll() is None
    ):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 130, output
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "interrupted", output
    stopped_at = load_checkpoint(run / "checkpoint_latest.pt")["step"]
    assert stopped_at == record["step"] >= 3
    resumed = subprocess.run(
        [*command, "--resume", "--max-steps", str(stopped_at + 3)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads((run / "run.json").read_text())["step"] == stopped_at + 3


def test_torchrun_two_processes_keep_identical_weights(synthetic: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "medlandmark",
        "train",
        str(synthetic),
        "-o",
        str(run),
        "--epochs",
        "1",
        "--iterations",
        "4",
        "--fold",
        "all",
        "-q",
    ]
    # a process group of its own, so that a hang kills the workers too, not only the launcher
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((run / "run.json").read_text())
    checksums = record["weight_checksum_per_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert record["step"] == 4 and record["status"] == "finished"


def test_short_run_on_real_isbi_images_lowers_the_loss(small_isbi: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(
        small_isbi,
        run,
        TrainOptions(
            configuration="2d_coarse", epochs=3, iterations_per_epoch=8, fold="all", batch_size=2
        ),
    )
    losses = _log_losses(run)
    assert losses[-1] < losses[0], losses
    assert np.isfinite(losses).all()


def test_fine_stage_offsets_come_from_the_coarse_runs_measured_error(
    small_isbi: Path, tmp_path: Path
) -> None:
    from medlandmark.training.loop import _fine_offset_sd

    coarse = train(
        small_isbi,
        tmp_path / "coarse",
        TrainOptions(configuration="2d_coarse", epochs=1, iterations_per_epoch=4, fold=0),
    )
    measured = coarse.best.error_sd_voxels
    assert len(measured) == 2 and all(v > 0 for v in measured)
    plan = load_plan(small_isbi / "preprocessed")
    fine = plan.configurations["2d_fine"]
    ratio = np.array(plan.configurations["2d_coarse"].spacing_mm) / np.array(fine.spacing_mm)
    limit = np.array(fine.patch_size) / 6  # a coarse error beyond half a patch cannot be refined
    np.testing.assert_allclose(
        _fine_offset_sd(fine, plan, str(tmp_path / "coarse")),
        np.minimum(np.array(measured) * ratio, limit),
    )
    record = json.loads((tmp_path / "coarse" / "run.json").read_text())
    record["best"]["error_sd_voxels"] = [0.5, 0.25]
    (tmp_path / "coarse" / "run.json").write_text(json.dumps(record))
    np.testing.assert_allclose(
        _fine_offset_sd(fine, plan, str(tmp_path / "coarse")), np.array([0.5, 0.25]) * ratio
    )
    record = train(
        small_isbi,
        tmp_path / "fine",
        TrainOptions(
            configuration="2d_fine",
            epochs=1,
            iterations_per_epoch=2,
            fold="all",
            coarse_run=str(tmp_path / "coarse"),
        ),
    )
    assert record.status == "finished"
    validated = train(  # a fine stage with validation cases: patches around displaced landmarks
        small_isbi,
        tmp_path / "fine_fold0",
        TrainOptions(
            configuration="2d_fine",
            epochs=1,
            iterations_per_epoch=2,
            fold=0,
            coarse_run=str(tmp_path / "coarse"),
        ),
    )
    assert validated.best is not None and validated.best.val_mre_mm > 0
    assert len(validated.error_bounds_mm) == 19  # its own bounds, for the cascade's points
    assert validated.verdict_thresholds is None  # cases are judged by the first stage
    _check_coarse_estimates(small_isbi, tmp_path / "coarse", coarse, plan)


def _check_coarse_estimates(root: Path, coarse_run: Path, coarse, plan) -> None:
    """The fine stage's validation patches centre on the coarse stage's estimates of its
    unseen cases, in the fine cache's voxels: their distance to the truth is the coarse
    validation's MRE; a case the coarse network trained on gives none."""
    from medlandmark.io.geometry import index_to_world
    from medlandmark.preprocessing import cache_folder, load_cached_case
    from medlandmark.training.validation import coarse_estimates_index

    folder = cache_folder(root / "preprocessed", plan.configurations["2d_fine"])
    cases = [load_cached_case(folder, c) for c in coarse.val_cases]
    centres = coarse_estimates_index(str(coarse_run), cases, torch.device("cpu"))
    distances = [
        np.linalg.norm(
            index_to_world(centre, case.geometry)
            - index_to_world(case.landmarks_index, case.geometry),
            axis=1,
        )
        for centre, case in zip(centres, cases, strict=True)
    ]
    assert np.nanmean(np.concatenate(distances)) == pytest.approx(coarse.best.val_mre_mm, rel=1e-4)
    seen = [load_cached_case(folder, coarse.train_cases[0])]
    assert coarse_estimates_index(str(coarse_run), seen, torch.device("cpu")) is None
    assert coarse_estimates_index(None, cases, torch.device("cpu")) is None


def test_training_ends_with_one_closing_line_and_resuming_a_finished_run_does_nothing(
    synthetic: Path, tmp_path: Path, capfd
) -> None:
    from medlandmark.console import configure

    configure(quiet=False)  # an earlier `-q` command in this worker may have quietened info lines
    options = TrainOptions(epochs=2, iterations_per_epoch=2, validate_every=1, seed=2)
    record = train(synthetic, tmp_path / "run", options)
    err = capfd.readouterr().err
    assert (
        f"finished unet 2d after 4 steps ({record.train_seconds:.0f} s): best validation MRE" in err
    )
    assert f"weights in {tmp_path / 'run' / 'model_best.safetensors'}" in err
    sdr = [line.split("SDR@2mm ")[1] for line in err.splitlines() if "SDR@2mm" in line]
    assert sdr and all(value.endswith("%") and len(value.split(".")[-1]) == 2 for value in sdr), sdr
    before = (tmp_path / "run" / "checkpoint_latest.pt").stat().st_mtime_ns
    again = train(synthetic, tmp_path / "run", options, resume=True)
    assert again.status == "finished" and again.step == 4
    assert "is already finished (step 4): nothing to resume" in capfd.readouterr().err
    assert (tmp_path / "run" / "checkpoint_latest.pt").stat().st_mtime_ns == before


def test_a_resumed_run_trains_with_the_settings_of_the_resuming_command(
    synthetic: Path, tmp_path: Path
) -> None:
    first = train(
        synthetic,
        tmp_path / "run",
        TrainOptions(epochs=2, iterations_per_epoch=2, max_steps=2, fold="all"),
    )
    assert first.status == "stopped" and first.step == 2
    longer = train(
        synthetic,
        tmp_path / "run",
        TrainOptions(epochs=3, iterations_per_epoch=2, fold="all"),
        resume=True,
    )
    assert longer.status == "finished" and longer.step == 6


def test_in_a_log_each_epochs_progress_line_comes_before_its_validation(
    synthetic: Path, tmp_path: Path, capfd
) -> None:
    from medlandmark.console import configure

    configure(quiet=False)
    train(
        synthetic,
        tmp_path / "run",
        TrainOptions(epochs=2, iterations_per_epoch=3, validate_every=1, seed=2),
    )
    lines = capfd.readouterr().err.splitlines()
    for step in (3, 6):
        progress = next(i for i, line in enumerate(lines) if f": {step}/6 " in line)
        validation = next(i for i, line in enumerate(lines) if line.startswith(f"step {step}:"))
        assert progress < validation, "\n".join(lines)


def test_validation_reads_the_memory_mapped_cache_without_a_warning(synthetic: Path) -> None:
    """The cache is memory-mapped read-only; handing it to torch as is warned ("not writable")."""
    import warnings

    from medlandmark.models import network_for
    from medlandmark.preprocessing import cache_folder, load_cached_case
    from medlandmark.training.validation import predict_cached_case

    plan = load_plan(synthetic / "preprocessed")
    configuration = plan.configuration(None)
    case = load_cached_case(cache_folder(synthetic / "preprocessed", configuration), "case000")
    network = network_for("unet", configuration, len(plan.landmarks), 1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        points, peaks = predict_cached_case(
            network, case, configuration.patch_size, torch.device("cpu")
        )
    assert points.shape == (len(plan.landmarks), 2) and peaks.shape == (len(plan.landmarks),)


def test_fine_validation_decodes_each_landmark_in_a_displaced_patch() -> None:
    """An exact stand-in network (its heatmaps are the image's blobs, one channel per landmark)
    finds every landmark in its patch however far (within the patch) the offset moved it."""
    from torch import nn

    from medlandmark.io.geometry import Geometry
    from medlandmark.preprocessing import CachedCase
    from medlandmark.training.validation import validate_fine

    class BlobsAreHeatmaps(nn.Module):
        def forward(self, x):
            return [x]

    points = np.array([[20.3, 30.0], [45.0, 12.6], [np.nan, np.nan]])
    grid = np.stack(np.meshgrid(np.arange(64), np.arange(64), indexing="ij"), -1)
    image = np.zeros((3, 64, 64), np.float32)
    for k in range(2):
        image[k] = np.exp(-np.sum((grid - points[k]) ** 2, -1) / (2 * 2.0**2))
    geometry = Geometry((0.5, 0.5), (0.0, 0.0), ((1.0, 0.0), (0.0, 1.0)), (64, 64))
    case = CachedCase("c", image, geometry, geometry, ["a", "b", "c"], points)
    result = validate_fine(BlobsAreHeatmaps(), [case], [24, 24], torch.device("cpu"), [3.0, 3.0])
    assert result.errors_mm[0, :2].max() < 0.05 and np.isnan(result.errors_mm[0, 2])
    assert result.truly_present.tolist() == [[True, True, False]]
    again = validate_fine(BlobsAreHeatmaps(), [case], [24, 24], torch.device("cpu"), [3.0, 3.0])
    np.testing.assert_array_equal(again.points_mm, result.points_mm)  # the same draw each time
    # centred on given (coarse) estimates: one 30 voxels off loses its blob, one on it keeps it,
    # one without an estimate falls back to the displaced landmark
    centres = [np.array([[50.3, 30.0], [45.0, 12.6], [np.nan, np.nan]])]
    led = validate_fine(
        BlobsAreHeatmaps(), [case], [24, 24], torch.device("cpu"), [3.0, 3.0], centres_index=centres
    )
    assert led.errors_mm[0, 0] > 5.0 and led.errors_mm[0, 1] < 0.05
    centres = [np.array([[np.nan, np.nan], [45.0, 12.6], [np.nan, np.nan]])]
    led = validate_fine(
        BlobsAreHeatmaps(), [case], [24, 24], torch.device("cpu"), [3.0, 3.0], centres_index=centres
    )
    assert led.errors_mm[0, :2].max() < 0.05
