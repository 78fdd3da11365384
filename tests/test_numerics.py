"""Numerics: a non-finite loss or gradient stops training naming the step, with the last good
state saved; fp16 overflow is skipped by the gradient scaler."""

from __future__ import annotations

import functools
import math
import re
import signal
from pathlib import Path

import pytest
import torch

from medlandmark.planning.planner import training_defaults
from medlandmark.records.run import RunSettings
from medlandmark.records.weights import load_checkpoint
from medlandmark.training import loop
from medlandmark.training.loop import TrainingError, TrainOptions, train
from medlandmark.training.state import TrainState, mixed_precision

from .conftest import synthetic_training_set

OPTIONS = {"epochs": 2, "iterations_per_epoch": 4, "fold": "all", "deterministic": True, "seed": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synthetic_training_set(
        tmp_path_factory.mktemp("numerics") / "ds", num_cases=4, size_px=32
    )


@pytest.fixture(scope="module")
def six_steps(tiny: Path, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights after six good steps."""
    run = tmp_path_factory.mktemp("six") / "run"
    train(tiny, run, TrainOptions(**OPTIONS, max_steps=6))
    return _weights(run)


def _inject(monkeypatch, at_call: int, corrupt) -> None:
    """Make the training loss of step ``at_call`` (0-based) ``corrupt(loss, outputs)``."""
    original, calls = loop.heatmap_training_loss, [0]

    def loss(model, outputs, points, config, settings):
        value = original(model, outputs, points, config, settings)
        calls[0] += 1
        return corrupt(value, outputs) if calls[0] == at_call + 1 else value

    monkeypatch.setattr(loop, "heatmap_training_loss", loss)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path / "checkpoint_latest.pt")["model"]


def _nan_gradient(loss: torch.Tensor, outputs) -> torch.Tensor:
    """The same (finite) loss, but NaN gradients: d sqrt(|x|)/dx at 0."""
    return loss + torch.sqrt((outputs[0].float().sum() * 0).abs())


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda loss, _: loss * math.nan, "the loss became nan"),
        (_nan_gradient, "the gradient norm became nan"),
    ],
    ids=["nan-loss", "nan-gradient"],
)
def test_non_finite_step_stops_naming_it_and_keeps_the_last_good_state(
    tiny: Path,
    six_steps,
    tmp_path: Path,
    monkeypatch,
    corrupt,
    message: str,
) -> None:
    _inject(monkeypatch, 6, corrupt)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingError) as raised:
        train(tiny, tmp_path / "run", TrainOptions(**OPTIONS))
    assert signal.getsignal(signal.SIGINT) is handler, "Ctrl-C is handled as before the failed run"
    text = str(raised.value)
    assert re.search(
        f"^{message}[^;]* in step 7; .*The last good state \\(after step 6\\)", text
    ), text
    assert str(tmp_path / "run" / "checkpoint_latest.pt") in text
    saved, good = _weights(tmp_path / "run"), six_steps
    assert load_checkpoint(tmp_path / "run" / "checkpoint_latest.pt")["step"] == 6
    for name, tensor in good.items():
        assert torch.isfinite(saved[name].float()).all() and torch.equal(saved[name], tensor), name
    monkeypatch.undo()
    record = train(
        tiny, tmp_path / "run", TrainOptions(**OPTIONS), resume=True
    )  # the saved state is usable
    assert record.status == "finished" and record.step == 8


def test_fp16_overflow_is_skipped_by_the_scaler_and_training_goes_on(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    fp16 = {**OPTIONS, "amp": "fp16"}
    train(tiny, tmp_path / "three", TrainOptions(**fp16, max_steps=3))
    before = load_checkpoint(tmp_path / "three" / "checkpoint_latest.pt")
    _inject(
        monkeypatch, 3, lambda loss, _: loss * 1e30
    )  # finite in fp32, overflows the fp16 gradients
    record = train(tiny, tmp_path / "run", TrainOptions(**fp16, max_steps=4))
    assert record.status == "stopped" and record.step == 4
    after = load_checkpoint(tmp_path / "run" / "checkpoint_latest.pt")
    assert after["scaler"]["scale"] == before["scaler"]["scale"] / 2  # the scale backed off...
    for name, tensor in before["model"].items():  # ...and the step was skipped: weights unchanged
        assert torch.equal(after["model"][name], tensor), name
    monkeypatch.undo()
    record = train(tiny, tmp_path / "run", TrainOptions(**fp16), resume=True)
    assert record.status == "finished" and record.step == 8
    final = _weights(tmp_path / "run")
    assert all(torch.isfinite(t.float()).all() for t in final.values())
    assert any(not torch.equal(final[n], t) for n, t in before["model"].items()), "training went on"


@pytest.mark.filterwarnings(
    "ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning"
)  # every step skipped
def test_fp16_run_whose_gradients_always_overflow_stops(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    original = loop.heatmap_training_loss
    monkeypatch.setattr(
        loop, "heatmap_training_loss", lambda *args: _nan_gradient(original(*args), args[1])
    )
    # start near the floor (2**-10) instead of 2**16: 7 skipped steps instead of 27
    monkeypatch.setattr(
        torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**-4)
    )
    with pytest.raises(TrainingError, match=r"fp16 loss scale fell .* in step 7;"):
        train(tiny, tmp_path / "run", TrainOptions(**{**OPTIONS, "epochs": 3}, amp="fp16"))
    saved = _weights(tmp_path / "run")
    assert all(torch.isfinite(t.float()).all() for t in saved.values())


def test_amp_choices() -> None:
    cpu = torch.device("cpu")
    settings = RunSettings(
        **{**training_defaults().model_dump(), "learning_rate": 1e-3, "batch_size": 2}
    )
    model = torch.nn.Linear(2, 2)
    dtype = mixed_precision("fp16", cpu)
    assert dtype == torch.float16 and TrainState.create(model, settings, dtype).scaler.is_enabled()
    dtype = mixed_precision("bf16", cpu)
    scaler = TrainState.create(model, settings, dtype).scaler
    assert dtype == torch.bfloat16 and not scaler.is_enabled()  # bf16 has fp32's range: no scaler
    assert mixed_precision("auto", cpu) is None and mixed_precision("off", cpu) is None
    with pytest.raises(TrainingError, match="unknown amp 'float16'.*fp16"):
        loop._amp_dtype("float16", cpu)
