"""Heatmap losses: the balanced loss keeps a small Gaussian from being outweighed by its map."""

from __future__ import annotations

import pytest
import torch

from medlandmark.heatmaps import gaussian_heatmaps
from medlandmark.planning.planner import training_defaults
from medlandmark.training.losses import heatmap_loss
from medlandmark.training.options import TrainingError, TrainOptions, run_settings

from .conftest import single_configuration_plan


def _sparse_target() -> tuple[torch.Tensor, torch.Tensor]:
    """Two channels of a 192 x 160 map with a sigma-2 Gaussian each (under 1 % of the voxels)."""
    points = torch.tensor([[[40.0, 50.0], [120.0, 100.0]]])
    return gaussian_heatmaps(points, (192, 160), 2.0)


def test_an_empty_map_is_cheap_under_mse_but_not_under_balanced_mse():
    target, present = _sparse_target()
    empty = torch.zeros_like(target)
    assert heatmap_loss(empty, target, present, "mse") < 0.005
    assert heatmap_loss(empty, target, present, "balanced_mse") > 0.2
    assert heatmap_loss(target, target, present, "balanced_mse") == 0.0


def test_balanced_mse_still_masks_landmarks_outside_the_patch():
    target, _ = _sparse_target()
    noise = target + 0.3
    only_first = torch.tensor([[True, False]])
    masked = heatmap_loss(noise, target, only_first, "balanced_mse")
    first_alone = heatmap_loss(noise[:, :1], target[:, :1], only_first[:, :1], "balanced_mse")
    assert masked == pytest.approx(float(first_alone))


def test_the_loss_is_chosen_by_option_and_checked():
    plan = single_configuration_plan("unet", {}, [32, 32], ["a"])
    plan.training = training_defaults().model_copy(update={"learning_rate": 1e-3, "loss": "mse"})
    assert run_settings(plan, TrainOptions(loss="balanced_mse")).loss == "balanced_mse"
    assert run_settings(plan, TrainOptions()).loss == "mse"
    with pytest.raises(TrainingError, match="unknown loss 'huber'"):
        run_settings(plan, TrainOptions(loss="huber"))


def test_centroid_term_charges_a_far_look_alike_by_its_distance_and_ignores_empty_targets():
    target, present = _sparse_target()
    far = torch.tensor([[[40.0, 150.0], [20.0, 10.0]]])
    near = torch.tensor([[[40.0, 56.0], [120.0, 106.0]]])
    far_peaks, _ = gaussian_heatmaps(far, (192, 160), 2.0)
    near_peaks, _ = gaussian_heatmaps(near, (192, 160), 2.0)
    # the true peak plus an equal one elsewhere: a far one is nearly free pixelwise (its error is
    # averaged over the whole background), which is how look-alikes survive training
    with_far, with_near = target + far_peaks, target + near_peaks
    assert heatmap_loss(with_far, target, present, "balanced_mse") < 0.001
    far_cost = heatmap_loss(with_far, target, present, "balanced_mse_centroid") - heatmap_loss(
        with_far, target, present, "balanced_mse"
    )
    near_cost = heatmap_loss(with_near, target, present, "balanced_mse_centroid") - heatmap_loss(
        with_near, target, present, "balanced_mse"
    )
    # half the mass 100 (first) and 134.5 (second) voxels off moves each centroid half-way: in units of 192
    assert float(far_cost) == pytest.approx(
        (100.0 + (100**2 + 90**2) ** 0.5) / 2 / 2 / 192, rel=1e-3
    )
    assert float(near_cost) == pytest.approx(3.0 / 192, rel=1e-3)
    assert heatmap_loss(target, target, present, "balanced_mse_centroid") < 1e-6
    empty_target = torch.zeros_like(target)  # a missing landmark trained toward "nothing here"
    assert heatmap_loss(
        target, empty_target, present, "balanced_mse_centroid", "zero"
    ) == pytest.approx(float(heatmap_loss(target, empty_target, present, "balanced_mse", "zero")))


def test_train_offers_exactly_the_registered_losses():
    """cli.py lists the loss names itself (importing the losses would import torch at start-up)."""
    from medlandmark.cli import build_parser
    from medlandmark.training.losses import HEATMAP_LOSSES

    verbs = next(a for a in build_parser()._actions if a.dest == "verb").choices
    loss = next(a for a in verbs["train"]._actions if a.dest == "loss")
    assert tuple(loss.choices) == HEATMAP_LOSSES


def test_a_peak_where_nothing_is_costs_as_much_as_no_peak_where_a_landmark_is():
    """balanced_mse with an empty target (missing_target="zero"): the brightest voxels, as many
    as a landmark's neighbourhood, are that channel's foreground."""
    target, present = _sparse_target()
    empty = torch.zeros_like(target)
    second_missing = torch.stack([target[:, 0], empty[:, 1]], dim=1)
    # a confident peak for the missing second landmark; before, its error was averaged over the
    # whole map and nearly free (~0.0003)
    false_cost = float(heatmap_loss(target, second_missing, present, "balanced_mse", "zero"))
    miss_cost = float(
        heatmap_loss(second_missing, target, present, "balanced_mse", "zero")
    )  # no peak for a present one
    assert false_cost > 0.1
    assert false_cost == pytest.approx(miss_cost, rel=0.05)
    assert (
        float(heatmap_loss(second_missing, second_missing, present, "balanced_mse", "zero")) == 0.0
    )
    # masked (the default), the missing channel is ignored whatever it shows
    assert (
        float(heatmap_loss(target, second_missing, torch.tensor([[True, False]]), "balanced_mse"))
        == 0.0
    )
    # with every target empty (a patch with no landmark), the single brightest voxel counts
    peak = empty.clone()
    peak[0, :, 10, 10] = 1.0
    assert float(heatmap_loss(peak, empty, present, "balanced_mse", "zero")) == pytest.approx(
        1.0 + 1.0 / (192 * 160), rel=1e-4
    )
