"""Training options beyond the defaults: EMA weights, bf16 autocast, SGD with the poly schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medlandmark.models import network_for
from medlandmark.records.run import read_run_record
from medlandmark.records.weights import load_checkpoint, load_weights
from medlandmark.training.loop import TrainingError, TrainOptions, train
from medlandmark.training.optimization import build_optimizer, learning_rate_factor

from .conftest import synthetic_training_set


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synthetic_training_set(tmp_path_factory.mktemp("opts") / "ds", num_cases=6, size_px=32)


def test_ema_weights_are_the_ones_saved(tiny: Path, tmp_path: Path) -> None:
    train(
        tiny,
        tmp_path / "run",
        TrainOptions(epochs=1, iterations_per_epoch=4, fold="all", ema_decay=0.5),
    )
    record = read_run_record(tmp_path / "run")
    model = network_for("unet", record.plan_configuration, len(record.landmarks))
    load_weights(tmp_path / "run" / "model_final.safetensors", model)
    raw = load_checkpoint(tmp_path / "run" / "checkpoint_latest.pt")
    assert raw["ema"] is not None
    trained = raw["model"]
    different = [
        n for n, p in model.state_dict().items() if n in trained and not torch.equal(p, trained[n])
    ]
    assert different, "the final weights should be the moving average, not the last step's"


def test_bf16_autocast_trains_on_cpu(tiny: Path, tmp_path: Path) -> None:
    record = train(
        tiny,
        tmp_path / "run",
        TrainOptions(epochs=1, iterations_per_epoch=3, fold="all", amp="bf16"),
    )
    assert record.status == "finished"


def test_sgd_with_poly_schedule(tiny: Path, tmp_path: Path) -> None:
    plan_path = tiny / "preprocessed" / "plans.json"
    plan = json.loads(plan_path.read_text())
    original = json.dumps(plan)
    plan["training"].update(optimizer="sgd", schedule="poly", learning_rate=0.01)
    plan_path.write_text(json.dumps(plan))
    try:
        record = train(
            tiny, tmp_path / "run", TrainOptions(epochs=1, iterations_per_epoch=3, fold="all")
        )
    finally:
        plan_path.write_text(original)
    assert record.settings.optimizer == "sgd" and record.status == "finished"
    state = load_checkpoint(tmp_path / "run" / "checkpoint_latest.pt")["optimizer"]
    assert state["param_groups"][0]["nesterov"] is True


def test_schedules_warm_up_then_decay() -> None:
    assert learning_rate_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert learning_rate_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert learning_rate_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert learning_rate_factor(100, 100, 10, "poly") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        learning_rate_factor(20, 100, 10, "step")
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(torch.nn.Linear(2, 2), "lion", 1e-3, 0.0, 0.9)


def test_augment_settings_from_the_command_line_reach_the_run(tiny: Path, tmp_path: Path) -> None:
    from medlandmark.cli import main

    code = main(
        [
            "train",
            str(tiny),
            "-o",
            str(tmp_path / "run"),
            "--fold",
            "all",
            "--epochs",
            "1",
            "--iterations",
            "2",
            "--missing-target",
            "zero",
            "--augment",
            "p_field_of_view_cut=0.5",
            "--augment",
            "scale=[0.8,1.2]",
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["options"]["augment"] == {"p_field_of_view_cut": 0.5, "scale": [0.8, 1.2]}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("p_field_of_view_cut=2", "p_field_of_view_cut: Input should be less than or equal to 1"),
        ("p_wobble=0.1", "p_wobble: Extra inputs are not permitted"),
    ],
)
def test_a_bad_augment_setting_is_refused_before_training(
    tiny: Path, tmp_path: Path, setting: str, message: str, capsys
) -> None:
    from medlandmark.cli import main

    assert (
        main(
            ["train", str(tiny), "-o", str(tmp_path / "run"), "--fold", "all", "--augment", setting]
        )
        != 0
    )
    assert f"bad augmentation setting: {message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_augment_option_needs_a_name_and_a_value(capsys) -> None:
    from medlandmark.cli import main

    with pytest.raises(SystemExit):
        main(["train", "ds", "-o", "run", "--augment", "p_rotation"])
    assert "expected NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "bad training setting: epochs: Input should be greater than or equal to 1"),
        (
            {"iterations_per_epoch": 0},
            "bad training setting: iterations_per_epoch: Input should be greater than or equal to 1",
        ),
        (
            {"batch_size": 0},
            "bad training setting: batch_size: Input should be greater than or equal to 1",
        ),
        ({"ema_decay": 2.0}, "bad training setting: ema_decay: Input should be less than 1"),
        (
            {"batch_size": 100_000},
            r"batch size 100000 needs at least \d+ GB for one training step of 2d, more than the \d+ GB here: use --batch-size \d+ or less",
        ),
    ],
)
def test_settings_that_cannot_train_are_refused_before_anything_is_written(
    tiny: Path, tmp_path: Path, change, message
) -> None:
    with pytest.raises(TrainingError, match=message):
        train(tiny, tmp_path / "run", TrainOptions(fold="all", **change))
    assert not (tmp_path / "run").exists()


def test_validation_cases_without_any_present_landmark_still_give_a_finished_run(
    tmp_path: Path, capfd
) -> None:
    from medlandmark.datasets.dataset import Dataset
    from medlandmark.datasets.synthetic import make_synthetic_dataset
    from medlandmark.planning import plan_dataset
    from medlandmark.preprocessing import preprocess_dataset
    from medlandmark.training.loop import fold_case_ids

    root = make_synthetic_dataset(tmp_path / "ds", num_cases=6, size_px=32, spacing_mm=1.0)
    _, validation = fold_case_ids(Dataset(root), 0, 5, 0)
    for case in validation:  # every landmark of the validation cases missing
        path = root / "landmarks" / f"{case}.csv"
        rows = path.read_text().splitlines()
        path.write_text("\n".join(rows[:2] + [f"{row.split(',')[0]},," for row in rows[2:]]) + "\n")
    plan_dataset(root, gpu_memory_gb=1.0, base_features=8)
    preprocess_dataset(root, workers=1)
    record = train(
        root, tmp_path / "run", TrainOptions(epochs=2, iterations_per_epoch=2, validate_every=1)
    )
    assert record.status == "finished" and record.best is None
    assert "no landmark is present in the validation cases" in capfd.readouterr().err
    for name in ("model_best.safetensors", "model_final.safetensors", "checkpoint_latest.pt"):
        assert (tmp_path / "run" / name).is_file(), name
