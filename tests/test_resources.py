"""Resources: out of memory during prediction falls back to smaller sliding-window batches, then
to the CPU, with the same landmarks; a full disk while checkpointing keeps the previous one."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medlandmark.datasets.dataset import DatasetSpec, write_spec
from medlandmark.errors import MedlandmarkError
from medlandmark.inference import predictor as predictor_module
from medlandmark.inference.predictor import Predictor, is_out_of_memory
from medlandmark.io.geometry import Geometry, index_to_world
from medlandmark.io.images import write_image
from medlandmark.io.landmarks import LandmarkSet, write_landmarks
from medlandmark.planning import plan_dataset
from medlandmark.records.run import RunRecord, write_run_record
from medlandmark.records.weights import load_checkpoint
from medlandmark.training import loop, state
from medlandmark.training.loop import TrainOptions, train

from .conftest import synthetic_training_set
from .test_checkpoint_sampling import _disk_full_after

PATCH = [32, 32]
SIGMA_MM = 4.0
OUT_OF_MEMORY = {
    "torch": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "old-backend": lambda: RuntimeError("CUDA error: out of memory"),
    "cpu-allocator": lambda: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"
    ),
}


class HeatmapIsTheImage(nn.Module):
    """A stand-in network (heatmap = input) that runs out of memory when ``fails(windows)``."""

    def __init__(self, fails=lambda windows: False, error=OUT_OF_MEMORY["torch"]):
        super().__init__()
        self.fails, self.error, self.batches = fails, error, []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fails(x):
            raise self.error()
        self.batches.append((x.shape[0], x.device.type))
        return [x[:, :1]]


@pytest.fixture(scope="module")
def blob_run(tmp_path_factory) -> tuple[Path, list[Path]]:
    """2D images with one Gaussian blob each, and a run whose 32x32 patch (4 per batch) needs
    many sliding windows over them."""
    root = tmp_path_factory.mktemp("oom")
    geometry = Geometry((0.8, 0.9), (10.0, -5.0), ((1.0, 0.0), (0.0, 1.0)), (90, 100))
    grid = index_to_world(
        np.stack(np.meshgrid(np.arange(90), np.arange(100), indexing="ij"), -1).reshape(-1, 2),
        geometry,
    )
    images = []
    for case in range(2):
        point = index_to_world(np.array([30.0 + 25 * case, 62.0 - 20 * case]), geometry)
        blob = 1000 * np.exp(-np.sum((grid - point) ** 2, axis=1) / (2 * SIGMA_MM**2)).reshape(
            geometry.shape
        )
        images.append(root / "ds" / "images" / f"c{case}.mha")
        write_image(images[-1], blob.astype(np.float32), geometry)
        write_landmarks(
            root / "ds" / "landmarks" / f"c{case}.json", LandmarkSet(["tip"], point[None])
        )
    write_spec(
        root / "ds",
        DatasetSpec(name="blob2d", spatial_dims=2, landmarks=["tip"], modalities=["mr"]),
    )
    plan = plan_dataset(root / "ds", gpu_memory_gb=24.0)
    name = plan.default_configuration
    plan.configurations[name].patch_size, plan.configurations[name].batch_size = PATCH, 4
    run = root / "run"
    run.mkdir()
    write_run_record(
        run,
        RunRecord(
            arch="unet", configuration=name, plan=plan, landmarks=["tip"], presence_threshold=0.2
        ),
    )
    return run, images


def _predictor(run: Path, network: nn.Module, device: str = "cpu") -> Predictor:
    return Predictor.from_run(run, device=device, network_factory=lambda record, folder: network)


def _assert_same(a, b) -> None:
    np.testing.assert_allclose(a.landmarks.points_mm, b.landmarks.points_mm, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.peak, b.peak, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.spread_mm, b.spread_mm, atol=1e-6, rtol=0)


@pytest.fixture
def warnings(monkeypatch) -> list[str]:
    said: list[str] = []
    monkeypatch.setattr(predictor_module, "warn", said.append)
    return said


@pytest.mark.parametrize("error", sorted(OUT_OF_MEMORY))
def test_out_of_memory_halves_the_windows_per_batch(
    blob_run, warnings: list[str], error: str
) -> None:
    run, images = blob_run
    plain = _predictor(run, HeatmapIsTheImage())
    assert plain.windows_per_batch == 4  # the plan's batch size
    network = HeatmapIsTheImage(lambda x: x.shape[0] > 1, OUT_OF_MEMORY[error])
    squeezed = _predictor(run, network)
    _assert_same(squeezed.predict(images[0]), plain.predict(images[0]))
    assert len(network.batches) > 10 and {size for size, _ in network.batches} == {1}
    assert squeezed.windows_per_batch == 1 and squeezed.device.type == "cpu"
    assert warnings == [
        f"{images[0]}: out of memory on cpu; retrying with 2 sliding window(s) per batch",
        f"{images[0]}: out of memory on cpu; retrying with 1 sliding window(s) per batch",
    ]
    _assert_same(squeezed.predict(images[1]), plain.predict(images[1]))
    assert len(warnings) == 2, "the next image starts at the batch size that fitted"


def test_out_of_memory_on_the_device_falls_back_to_the_cpu(blob_run, warnings: list[str]) -> None:
    """'meta' stands for a GPU here: a real device other than the CPU, always out of memory."""
    run, images = blob_run
    network = HeatmapIsTheImage(lambda x: x.device.type != "cpu")
    on_device = _predictor(run, network, device="meta")
    assert on_device.device.type == "meta"
    prediction = on_device.predict(images[1], name="c1")
    _assert_same(prediction, _predictor(run, HeatmapIsTheImage()).predict(images[1]))
    assert on_device.device.type == "cpu" and {device for _, device in network.batches} == {"cpu"}
    assert len(warnings) == 3 and warnings[-1].startswith(
        "c1: out of memory on meta even with one sliding window per batch; falling back to the CPU"
    )
    assert all(w.startswith("c1: out of memory on meta") for w in warnings)


def test_out_of_memory_on_the_cpu_with_one_window_fails_this_image_clearly(
    blob_run, warnings: list[str]
) -> None:
    run, images = blob_run
    predictor = _predictor(run, HeatmapIsTheImage(lambda x: True, OUT_OF_MEMORY["cpu-allocator"]))
    with pytest.raises(
        MedlandmarkError, match="out of memory on the CPU even with one sliding window per batch"
    ) as raised:
        predictor.predict(images[0])
    assert str(images[0]) in str(raised.value)


def test_other_errors_are_not_taken_for_out_of_memory(blob_run, warnings: list[str]) -> None:
    run, images = blob_run
    predictor = _predictor(
        run,
        HeatmapIsTheImage(
            lambda x: True, lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        ),
    )
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        predictor.predict(images[0])
    assert warnings == [] and predictor.windows_per_batch == 4
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return synthetic_training_set(tmp_path_factory.mktemp("disk") / "ds", num_cases=4, size_px=32)


def _full_at_call(monkeypatch, module, name: str, number: int, fill) -> list:
    """Make call ``number`` of ``module.<name>`` run on a full disk (``fill(original, args)``)."""
    original, calls = getattr(module, name), []

    def on_a_full_disk(*args):
        calls.append(args)
        return fill(original, args) if len(calls) == number else original(*args)

    monkeypatch.setattr(module, name, on_a_full_disk)
    return calls


def _checkpoint_on_a_full_disk(original, args):
    with _disk_full_after(4096):  # real writes failing, through torch.save's own error path
        return original(*args)


def _text_on_a_full_disk(original, args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    ("module", "name", "number", "fill", "message"),
    [  # the second checkpoint; the second epoch's log.csv
        (
            state,
            "save_checkpoint",
            2,
            _checkpoint_on_a_full_disk,
            "checkpoint_latest.pt: could not write the checkpoint: .*MB free on its disk.*previous one is intact",
        ),
        (
            loop,
            "atomic_write_text",
            2,
            _text_on_a_full_disk,
            "run: No space left on device; the last checkpoint is intact: free some space, then --resume",
        ),
    ],
    ids=["checkpoint", "log"],
)
def test_disk_full_during_training_keeps_the_previous_checkpoint(
    dataset: Path,
    tmp_path: Path,
    monkeypatch,
    module,
    name: str,
    number: int,
    fill,
    message: str,
) -> None:
    run, options = tmp_path / "run", {"epochs": 3, "iterations_per_epoch": 2, "fold": "all"}
    calls = _full_at_call(monkeypatch, module, name, number, fill)
    with pytest.raises(MedlandmarkError, match=message):  # a clear one-line error, no traceback
        train(dataset, run, TrainOptions(**options))
    assert len(calls) == number
    assert load_checkpoint(run / "checkpoint_latest.pt")["step"] == 2
    assert not [p.name for p in run.iterdir() if ".partial-" in p.name]
    monkeypatch.undo()
    record = train(dataset, run, TrainOptions(**options), resume=True)
    assert record.status == "finished" and record.step == 6
