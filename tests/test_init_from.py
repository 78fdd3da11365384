"""train --init-from: another run's weights, landmarks matched by name, a fine-tuning schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medlandmark.models import network_for
from medlandmark.records.model_card import shipped_models
from medlandmark.records.run import read_run_record
from medlandmark.training.init_from import MIXED, initial_run, landmark_axes, load_initial_weights
from medlandmark.training.loop import TrainOptions, train
from medlandmark.training.options import TrainingError

from .conftest import synthetic_training_set


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny dataset and a run trained on it (inside a folder of runs)."""
    root = tmp_path_factory.mktemp("init")
    dataset = synthetic_training_set(root / "ds", num_cases=8, size_px=48)
    options = TrainOptions(epochs=1, iterations_per_epoch=3, validate_every=1, seed=3)
    train(dataset, root / "runs" / "first", options)
    return dataset, root / "runs" / "first"


def test_the_same_landmarks_load_every_weight(source_run) -> None:
    _, run = source_run
    record = read_run_record(run)
    configuration = record.plan_configuration
    model = network_for("unet", configuration, len(record.landmarks))
    load_initial_weights(model, run, "unet", configuration, record.landmarks, 1)
    saved = load_file(str(run / "model_best.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert initial_run(str(run.parent), configuration.name) == run  # a folder of runs


def test_other_landmarks_are_matched_by_name_and_new_ones_start_fresh(source_run) -> None:
    _, run = source_run
    record = read_run_record(run)
    configuration = record.plan_configuration
    wanted = [record.landmarks[4], "brand_new", record.landmarks[1]]
    torch.manual_seed(0)
    model = network_for("unet", configuration, len(wanted))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_initial_weights(model, run, "unet", configuration, wanted, 1)
    saved = load_file(str(run / "model_best.safetensors"))
    axes = landmark_axes("unet", configuration, 1)
    per_landmark = [k for k, axis in axes.items() if axis is not None]
    assert per_landmark and all(axes[k] == 0 for k in per_landmark)  # the U-Net's heads
    assert MIXED not in axes.values()
    state = model.state_dict()
    for key in per_landmark:
        assert torch.equal(state[key][0], saved[key][4]) and torch.equal(
            state[key][2], saved[key][1]
        )
        assert torch.equal(state[key][1], fresh[key][1])  # the new landmark: as initialised
    shared = next(k for k, axis in axes.items() if axis is None)
    assert torch.equal(state[shared], saved[shared])


def test_hyatt_correction_module_mixes_landmark_channels() -> None:
    from .conftest import single_configuration_plan

    plan = single_configuration_plan("hyatt", {"width_multiplier": 0.25}, [256, 256], ["a", "b"])
    axes = landmark_axes("hyatt", plan.configuration(), 1)
    assert MIXED in axes.values() and 0 in axes.values()


def test_a_source_that_does_not_fit_is_refused_with_the_reason(source_run, tmp_path) -> None:
    _, run = source_run
    record = read_run_record(run)
    configuration = record.plan_configuration
    model = network_for("unet", configuration, 2)
    with pytest.raises(TrainingError, match="none of this dataset's landmarks"):
        load_initial_weights(model, run, "unet", configuration, ["x", "y"], 1)
    with pytest.raises(TrainingError, match="is a unet run; this run trains hyatt"):
        load_initial_weights(model, run, "hyatt", configuration, record.landmarks[:2], 1)
    with pytest.raises(TrainingError, match="neither a run folder nor a shipped model"):
        initial_run(str(tmp_path / "nowhere"), configuration.name)
    with pytest.raises(TrainingError, match="no run of configuration 'other'"):
        initial_run(str(run.parent), "other")


def test_training_from_a_run_starts_from_its_weights_with_a_smaller_rate(
    source_run, tmp_path
) -> None:
    dataset, run = source_run
    options = TrainOptions(epochs=1, iterations_per_epoch=2, seed=3, init_from=str(run))
    record = train(dataset, tmp_path / "tuned", options)
    first = read_run_record(run)
    assert record.status == "finished" and record.options["init_from"] == str(run)
    assert record.settings.learning_rate == pytest.approx(0.2 * first.settings.learning_rate)
    assert record.settings.warmup_epochs <= 1
    assert record.shape_model is not None and record.presence_threshold is not None  # refitted
    assert json.loads((tmp_path / "tuned" / "run.json").read_text())["options"]["init_from"]
    still = TrainOptions(
        epochs=1, iterations_per_epoch=1, seed=3, init_from=str(run), learning_rate=1e-12
    )
    train(dataset, tmp_path / "still", still)  # a step too small to move: the source's weights
    saved = load_file(str(run / "model_best.safetensors"))
    kept = load_file(str(tmp_path / "still" / "model_final.safetensors"))
    assert all(torch.allclose(kept[k], saved[k], atol=1e-6) for k in saved)


def test_a_shipped_model_is_a_source_by_name() -> None:
    for model in shipped_models():
        configuration = read_run_record(next(model.runs.iterdir())).configuration
        assert initial_run(model.name, configuration).parent == model.runs


def test_plans_from_a_run_gives_another_dataset_the_same_networks(source_run, tmp_path) -> None:
    from medlandmark.cli import main
    from medlandmark.datasets.synthetic import make_synthetic_dataset
    from medlandmark.planning import load_plan

    _, run = source_run
    other = make_synthetic_dataset(tmp_path / "other", num_cases=6, size_px=64, seed=9)
    assert main(["plan", str(other), "--plans-from", str(run.parent), "-q"]) == 0
    plan, source = load_plan(other / "preprocessed"), read_run_record(run).plan
    assert plan.configurations == source.configurations and plan.dataset_path == str(other)
    assert main(["preprocess", str(other), "--workers", "1", "-q"]) == 0
    options = TrainOptions(epochs=1, iterations_per_epoch=1, seed=3, init_from=str(run))
    assert train(other, tmp_path / "tuned", options).status == "finished"
    assert main(["plan", str(other), "--plans-from", str(tmp_path / "nowhere"), "-q"]) == 2
