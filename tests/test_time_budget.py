"""train --time-budget: training stops when its time is spent, and the learning-rate schedule
runs over the time used, so a slow stretch costs its own seconds, not the rest of the run."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from medlandmark.records.weights import load_checkpoint
from medlandmark.training import loop
from medlandmark.training.loop import TrainOptions, train
from medlandmark.training.optimization import time_learning_rate_factor

from .conftest import synthetic_training_set

BUDGET_S = 3.0
LEARNING_RATE = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synthetic_training_set(tmp_path_factory.mktemp("budget") / "ds", num_cases=4, size_px=32)


def _options(**changes) -> TrainOptions:
    """Far more steps than the budget allows: the clock decides."""
    settings = {
        "epochs": 10_000,
        "iterations_per_epoch": 5,
        "fold": "all",
        "learning_rate": LEARNING_RATE,
    }
    return TrainOptions(**{**settings, "time_budget_s": BUDGET_S, **changes})


def _learning_rates(run: Path) -> list[float]:
    return [float(row["learning_rate"]) for row in csv.DictReader((run / "log.csv").open())]


def test_the_schedule_follows_the_share_of_the_budget_used() -> None:
    assert time_learning_rate_factor(0.05, 0.1, "cosine") == pytest.approx(0.5)  # warming up
    assert time_learning_rate_factor(0.1, 0.1, "cosine") == pytest.approx(1.0)
    assert time_learning_rate_factor(0.55, 0.1, "cosine") == pytest.approx(0.5)
    assert time_learning_rate_factor(1.0, 0.1, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert time_learning_rate_factor(1.0, 0.0, "poly") == pytest.approx(0.0, abs=1e-12)


def test_training_stops_when_the_budget_is_spent_with_the_schedule_complete(
    tiny: Path, tmp_path: Path
) -> None:
    record = train(tiny, tmp_path / "run", _options())
    assert record.status == "finished" and 5 <= record.step < 10_000 * 5
    assert BUDGET_S <= record.train_seconds < BUDGET_S + 2.0
    rates = _learning_rates(tmp_path / "run")
    assert (
        max(rates) > 0.5 * LEARNING_RATE and rates[-1] < 0.05 * LEARNING_RATE
    )  # decayed to the end
    assert load_checkpoint(tmp_path / "run" / "checkpoint_latest.pt")["seconds"] >= BUDGET_S


def test_a_slow_stretch_costs_its_seconds_not_the_run(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    """Steps 10-14 take 0.3 s longer each (another job on the cores): the run still ends on time
    with its schedule complete, having trained fewer steps, instead of overrunning its budget."""
    original = loop.train_step

    def contended(run, step):
        if 10 <= step < 15:
            time.sleep(0.3)
        return original(run, step)

    steady = train(tiny, tmp_path / "steady", _options())
    monkeypatch.setattr(loop, "train_step", contended)
    slowed = train(tiny, tmp_path / "slowed", _options())
    assert slowed.status == "finished" and BUDGET_S <= slowed.train_seconds < BUDGET_S + 2.0
    assert slowed.step < steady.step
    assert _learning_rates(tmp_path / "slowed")[-1] < 0.05 * LEARNING_RATE


def test_a_resumed_run_keeps_the_time_it_has_already_used(tiny: Path, tmp_path: Path) -> None:
    first = train(tiny, tmp_path / "run", _options(max_steps=10))
    assert first.status == "stopped" and first.step == 10 and 0 < first.train_seconds < BUDGET_S
    second = train(tiny, tmp_path / "run", _options(), resume=True)
    assert second.status == "finished" and second.step > 10
    assert BUDGET_S <= second.train_seconds < BUDGET_S + 2.0
