"""The papers' training recipes (``train --recipe``): settings, targets, loss, schedule, and the
HYATT-Net prediction rule (mean of the heads' points)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medlandmark.datasets.synthetic import make_synthetic_volume_dataset
from medlandmark.errors import MedlandmarkError
from medlandmark.heatmaps import (
    decode_heads,
    gaussian_heatmaps,
    points_at_stride,
    radius_bump_heatmaps,
)
from medlandmark.inference.predictor import Predictor
from medlandmark.planning import plan_dataset
from medlandmark.preprocessing import preprocess_dataset
from medlandmark.sliding_window import head_strides, sliding_window_outputs
from medlandmark.training.losses import CHANNEL_LOSSES
from medlandmark.training.optimization import EXPONENTIAL_FLOOR, decay_factor
from medlandmark.training.options import TrainingError, TrainOptions, run_settings
from medlandmark.training.recipes import RECIPES, recipe_arch
from medlandmark.training.state import warmup_steps

from .conftest import single_configuration_plan, synthetic_training_set


def _plan():
    return single_configuration_plan("hyatt", {}, [64, 64], ["a", "b"])


def test_a_recipe_replaces_the_plans_training_and_the_command_line_still_wins() -> None:
    plan = _plan()
    settings = run_settings(plan, TrainOptions(arch="hyatt", recipe="hyatt-paper"))
    assert settings.recipe == "hyatt-paper" and settings.loss == "mse"
    assert settings.learning_rate == 4.5e-4 and settings.heatmap_sigma_voxels == 4.0
    assert settings.prediction == "mean_of_heads" and settings.warmup_share == 0.25
    assert settings.batch_size == plan.configurations["fine"].batch_size  # still the plan's
    changed = run_settings(
        plan, TrainOptions(arch="hyatt", recipe="hyatt-paper", learning_rate=1e-3)
    )
    assert changed.learning_rate == 1e-3 and changed.loss == "mse"
    plain = run_settings(plan, TrainOptions(arch="hyatt"))
    assert plain.recipe is None and plain.prediction == "full_resolution"


def test_a_recipe_refuses_another_network_and_unknown_names() -> None:
    with pytest.raises(TrainingError, match="h3de-paper trains h3de, not hyatt"):
        run_settings(_plan(), TrainOptions(arch="hyatt", recipe="h3de-paper"))
    with pytest.raises(TrainingError, match="unknown recipe 'nope'"):
        run_settings(_plan(), TrainOptions(arch="hyatt", recipe="nope"))
    assert recipe_arch("h3de-paper", None) == "h3de" and recipe_arch(None, None) == "unet"
    assert recipe_arch("h3de-paper", "unet") == "unet"  # then refused by run_settings


def test_every_recipe_makes_valid_settings_for_its_network() -> None:
    for recipe in RECIPES.values():
        ndim = 2 if recipe.arch == "hyatt" else 3
        plan = single_configuration_plan(recipe.arch, {}, [32] * ndim, ["a"])
        settings = run_settings(plan, TrainOptions(arch=recipe.arch, recipe=recipe.name))
        assert settings.recipe == recipe.name


def test_radius_bump_is_h3de_nets_target() -> None:
    points = torch.tensor([[[10.0, 10.0, 10.0], [math.nan] * 3]])
    target, present = radius_bump_heatmaps(points, (24, 24, 24), 5.0)
    assert present.tolist() == [[True, False]]
    assert target[0, 0, 10, 10, 10] == pytest.approx(2.0)
    assert target[0, 0, 10, 10, 15] == pytest.approx(2 * math.exp(-25 / (0.2 * 25)))  # the rim
    assert target[0, 0, 10, 10, 16] == -1.0 and target[0, 0, 0, 0, 0] == -1.0
    assert bool((target[0, 1] == -1).all())  # missing: -1 everywhere
    inside = (target[0, 0] >= 0).sum().item()
    assert inside == sum(
        1
        for i in range(24)
        for j in range(24)
        for k in range(24)
        if (i - 10) ** 2 + (j - 10) ** 2 + (k - 10) ** 2 <= 25
    )


def test_hard_negative_loss_trains_the_ball_and_the_hardest_voxels_outside() -> None:
    loss = CHANNEL_LOSSES["hard_negative_smooth_l1"]
    target, _ = radius_bump_heatmaps(torch.tensor([[[8.0, 8.0]]]), (17, 17), 2.0)
    assert loss(target.clone(), target).item() == pytest.approx(0.0)
    inside = int((target >= 0).sum())
    spiked = target.clone()
    spiked[0, 0, 0, 0] = 1.0  # one confident voxel far outside: a hard negative
    expected = 2.0 - 0.5  # SmoothL1 (beta 1) of |1 - (-1)| = 2
    assert loss(spiked, target).item() == pytest.approx(expected / inside)
    shifted = target.clone()
    shifted[target < 0] = -0.9  # every outside voxel a little high: only `inside` of them count
    assert loss(shifted, target).item() == pytest.approx(0.5 * 0.1**2)
    empty = torch.full_like(target, -1.0)
    prediction = empty.clone()
    prediction[0, 0, 3, 3] = 0.0  # an empty target: its single hardest voxel
    assert loss(prediction, empty).item() == pytest.approx(0.5)


def test_exponential_schedule_and_warmup_share() -> None:
    assert decay_factor(0.5, "exponential", 20) == pytest.approx(0.98**10)
    assert decay_factor(1.0, "exponential", 1000) == EXPONENTIAL_FLOOR
    plan = _plan()
    settings = run_settings(
        plan,
        TrainOptions(arch="hyatt", recipe="hyatt-paper", epochs=8, iterations_per_epoch=10),
    )
    assert warmup_steps(settings) == 20  # a quarter of the run, not the plan's tenth at most
    plain = run_settings(plan, TrainOptions(arch="hyatt", epochs=8, iterations_per_epoch=10))
    assert warmup_steps(plain) <= 8


class _TwoHeads(nn.Module):
    """Outputs the Gaussians of fixed points: full resolution at ``full``, stride 2 at ``half``."""

    output_strides = [(1, 1), (2, 2)]

    def __init__(self, full, half):
        super().__init__()
        self.full, self.half = torch.tensor([[full]]), torch.tensor([[half]])

    def forward(self, x):
        batch, _, h, w = x.shape
        at_full, _ = gaussian_heatmaps(self.full.expand(batch, 1, 2), (h, w), 2.0)
        at_half, _ = gaussian_heatmaps(
            points_at_stride(self.half.expand(batch, 1, 2), 2), (h // 2, w // 2), 1.0
        )
        return [at_full, at_half]


def test_mean_of_heads_averages_the_points_of_each_head_at_full_resolution() -> None:
    model = _TwoHeads([20.3, 30.0], [24.7, 30.6])  # the stride-2 head places it elsewhere
    image = torch.zeros(1, 64, 64)
    strides = head_strides(model, "mean_of_heads", 2)
    heads = sliding_window_outputs(model, image, (64, 64), strides)
    assert heads.shape == (2, 1, 64, 64)
    points = decode_heads(heads, strides).points[0, 0].numpy()
    np.testing.assert_allclose(points, [22.5, 30.3], atol=0.1)
    alone = head_strides(model, "full_resolution", 2)
    full = decode_heads(sliding_window_outputs(model, image, (64, 64), alone), alone)
    np.testing.assert_allclose(full.points[0, 0].numpy(), [20.3, 30.0], atol=0.05)
    with pytest.raises(ValueError, match="needs the PyTorch network"):
        head_strides(object(), "mean_of_heads", 2)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return synthetic_training_set(
        tmp_path_factory.mktemp("recipes") / "ds", num_cases=8, size_px=48
    )


def test_hyatt_paper_trains_and_predicts_with_the_mean_of_its_heads(
    synthetic: Path, tmp_path: Path
) -> None:
    options = TrainOptions(
        arch="hyatt", recipe="hyatt-paper", epochs=2, iterations_per_epoch=2, validate_every=1
    )
    record = train_run(synthetic, tmp_path / "run", options)
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["settings"]["recipe"] == "hyatt-paper" and record.best is not None
    predictor = Predictor.from_run(tmp_path / "run", device="cpu")
    assert predictor.stages[0].prediction == "mean_of_heads"
    image = sorted((synthetic / "images").iterdir())[-1]
    prediction = predictor.predict(image)
    assert prediction.landmarks.points_mm.shape == (9, 2)
    assert np.all((prediction.peak >= 0) & (prediction.peak <= 1))  # confidences
    bounds = prediction.landmarks.error_bound_mm  # the run's validated radii, where present
    present = prediction.present
    assert bounds is not None and np.all(bounds[present] > 0) and np.isnan(bounds[~present]).all()
    network = predictor.stages[0].networks[0]
    outputs_only = Predictor.from_run(
        tmp_path / "run", device="cpu", network_factory=lambda record, folder: network.forward
    )  # what ONNX Runtime gives: outputs, no heads' strides
    with pytest.raises(MedlandmarkError, match="mean_of_heads needs the PyTorch network"):
        outputs_only.predict(image)


def train_run(dataset: Path, run: Path, options: TrainOptions):
    from medlandmark.training.loop import train

    return train(dataset, run, options)


def test_h3de_paper_trains_on_volumes_with_its_bump_targets(tmp_path_factory) -> None:
    root = make_synthetic_volume_dataset(
        tmp_path_factory.mktemp("h3de") / "ds", num_cases=6, size_vox=32
    )
    plan_dataset(root, gpu_memory_gb=1.0)
    preprocess_dataset(root, workers=1)
    run = tmp_path_factory.mktemp("h3de_run") / "run"
    options = TrainOptions(
        recipe="h3de-paper", arch="h3de", epochs=1, iterations_per_epoch=2, validate_every=1
    )
    record = train_run(root, run, options)
    assert record.status == "finished" and record.settings.target == "radius_bump"
    assert record.settings.optimizer == "adam" and record.settings.adam_betas == (0.9, 0.98)
    assert math.isfinite(record.best.val_mre_mm)


def test_the_bump_radius_is_the_papers_share_of_the_patch() -> None:
    from medlandmark.heatmaps import bump_radius_voxels

    assert bump_radius_voxels((128, 128, 64)) == 20.0  # the paper's patches
    assert bump_radius_voxels((32, 32, 32)) == 5.0
    assert bump_radius_voxels((40, 48, 40)) == pytest.approx(7.5)
    assert bump_radius_voxels((256, 256, 128)) == 20.0
