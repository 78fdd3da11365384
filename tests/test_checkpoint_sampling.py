"""Sampling from the cache and checkpoints that never execute code."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medlandmark.io.geometry import Geometry
from medlandmark.preprocessing import CachedCase
from medlandmark.records.weights import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from medlandmark.training.sampling import PatchSampler, crop_case


def _case(shape=(40, 50), points=((10.0, 12.0), (30.5, 40.25))) -> CachedCase:
    image = np.arange(np.prod(shape), dtype=np.float16).reshape(1, *shape)
    geometry = Geometry.identity(shape)
    return CachedCase(
        "c0", image, geometry, geometry, ["a", "b"], np.array(points, dtype=np.float64)
    )


def test_crop_is_zero_padded_outside_and_shifts_landmarks() -> None:
    case = _case()
    crop = crop_case(case, (-5, 45), (10, 10))
    assert crop.image.shape == (1, 10, 10)
    assert (crop.image[:, :5] == 0).all() and (crop.image[:, :, 5:] == 0).all()
    np.testing.assert_array_equal(
        crop.image[0, 5:, :5], case.image[0, :5, 45:50].astype(np.float32)
    )
    np.testing.assert_allclose(crop.points, case.landmarks_index - [-5, 45])


def test_sampler_is_reproducible_per_step_and_differs_between_ranks() -> None:
    cases = [_case()]
    first = PatchSampler(cases, (16, 16), seed=3).batch(step=7, batch_size=4)
    again = PatchSampler(cases, (16, 16), seed=3).batch(step=7, batch_size=4)
    other_rank = PatchSampler(cases, (16, 16), seed=3, rank=1).batch(step=7, batch_size=4)
    assert all(np.array_equal(a.start, b.start) for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a.start, b.start) for a, b in zip(first, other_rank, strict=True))


def test_landmark_fraction_centres_patches_near_landmarks() -> None:
    sampler = PatchSampler(
        [_case((400, 400), ((50.0, 60.0), (300.0, 320.0)))], (32, 32), landmark_fraction=1.0
    )
    for index in range(50):
        crop = sampler.sample(0, index)
        inside = np.all((crop.points >= 0) & (crop.points < 32), axis=1)
        assert inside.any(), crop.start


def test_fine_stage_centres_on_landmarks_with_the_given_spread() -> None:
    sampler = PatchSampler(
        [_case((400, 400), ((200.0, 200.0), (200.0, 200.0)))],
        (33, 33),
        fine_offset_sd_voxels=(3.0, 3.0),
    )
    centres = np.array([sampler.sample(0, i).start + 16 for i in range(400)])
    assert np.abs(centres.mean(axis=0) - 200).max() < 0.6
    assert 2.4 < centres.std(axis=0).mean() < 3.6


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    state = {
        "step": 12,
        "model": {"w": torch.arange(4.0)},
        "note": "x",
        "rng": torch.get_rng_state(),
    }
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["step"] == 12 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "checkpoint_latest.pt"
    with path.open("wb") as handle:
        pickle.dump({"checkpoint_version": 1, "model": payload}, handle)
    with pytest.raises(CheckpointError, match="refused to load") as raised:
        load_checkpoint(path)
    assert str(path) in str(raised.value)
    assert not marker.exists(), "the pickled payload ran"
    torch.save(
        {"checkpoint_version": 1, "model": payload}, path
    )  # the same inside torch's zip format
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists(), "the pickled payload ran"
    pickle.loads(pickle.dumps(payload))  # the payload is real: unrestricted unpickling runs it
    assert marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {"step": 1, "w": torch.zeros(1000)})
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "c.pt")


@contextlib.contextmanager
def _disk_full_after(size_bytes: int):
    """Writes fail past ``size_bytes`` (RLIMIT_FSIZE), through the same error paths as a full disk."""
    resource = pytest.importorskip("resource")
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_handler)


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {"step": 1, "w": torch.ones(10)})
    with (
        _disk_full_after(20_000),
        pytest.raises(
            CheckpointError, match="could not write the checkpoint.*previous one is intact"
        ),
    ):
        save_checkpoint(tmp_path / "c.pt", {"step": 2, "w": torch.zeros(100_000)})
    assert load_checkpoint(tmp_path / "c.pt")["step"] == 1
    kept, newer, loaded = nn.Linear(200, 200), nn.Linear(200, 200), nn.Linear(200, 200)
    save_weights(tmp_path / "m.safetensors", kept)
    with (
        _disk_full_after(20_000),
        pytest.raises(CheckpointError, match="could not write the weights"),
    ):
        save_weights(tmp_path / "m.safetensors", newer)
    load_weights(tmp_path / "m.safetensors", loaded)
    assert torch.equal(loaded.weight, kept.weight)  # the previous weights, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "m.safetensors"]


def test_safetensors_weights_round_trip_and_mismatch_is_explained(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    save_weights(tmp_path / "m.safetensors", model)
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    load_weights(tmp_path / "m.safetensors", other)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(3, 5)))
