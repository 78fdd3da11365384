"""U-Net baseline: built from the plan's topology, forward and backward in 2D and 3D."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medlandmark.models import build_model, count_parameters, forward_flops, network_for
from medlandmark.planning.planner import network_topology
from medlandmark.records.plan import Plan

GOLDEN = Path(__file__).parent / "golden"


def _sizes(patch: list[int], spacing: list[float]) -> tuple[list[int], dict]:
    """A patch fitted to the topology, and the U-Net's builder arguments."""
    topology = network_topology(patch, spacing)
    features = [min(8 * 2**i, 64) for i in range(len(topology.strides))]
    sizes = {
        "features_per_stage": features,
        "strides": topology.strides,
        "kernel_sizes": topology.kernel_sizes,
        "n_conv_per_stage": 2,
    }
    return topology.patch_size, sizes


@pytest.mark.parametrize(
    ("patch", "spacing"), [([64, 48], [1.0, 1.0]), ([16, 32, 32], [3.0, 0.8, 0.8])]
)
def test_forward_backward_with_deep_supervision(patch: list[int], spacing: list[float]) -> None:
    torch.manual_seed(0)
    patch, sizes = _sizes(patch, spacing)
    model = build_model("unet", num_landmarks=5, spatial_dims=len(patch), **sizes)
    x = torch.randn(2, 1, *patch)
    outputs = model(x)
    assert len(outputs) == len(model.output_strides) == len(model.output_weights)
    for heatmaps, stride in zip(outputs, model.output_strides, strict=True):
        expected = [n // s for n, s in zip(patch, stride, strict=True)]
        assert list(heatmaps.shape) == [2, 5, *expected]
    assert model.output_strides[0] == (1,) * len(patch)
    assert sum(model.output_weights) == pytest.approx(1.0)
    assert model.output_weights == sorted(model.output_weights, reverse=True)  # 1/2^i
    levels = len(sizes["strides"]) - 1
    assert len(outputs) == levels - 1  # the lowest decoder stage is not supervised: no head
    sum(
        (w * o.square().mean()) for w, o in zip(model.output_weights, outputs, strict=True)
    ).backward()
    for name, parameter in model.named_parameters():  # no unused parameters: DDP needs that
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_anisotropic_plan_does_not_pool_the_thick_axis_first() -> None:
    _, sizes = _sizes([16, 32, 32], [3.0, 0.8, 0.8])
    model = build_model("unet", num_landmarks=2, spatial_dims=3, **sizes)
    assert model.output_strides[1] == (1, 2, 2)


def test_real_plan_sizes_and_flops_on_the_meta_device() -> None:
    plan = Plan.model_validate_json((GOLDEN / "plans_isbi2015.json").read_text())
    config = plan.configurations["2d_fine"]
    model = network_for("unet", config, num_landmarks=19)
    assert (
        model.encoder[0][0][0].out_channels == config.architectures["unet"]["features_per_stage"][0]
    )
    assert 10e6 < count_parameters(model) < 60e6
    small = forward_flops(network_for("unet", config, 19), (1, 1, 128, 128))
    large = forward_flops(network_for("unet", config, 19), (1, 1, 256, 256))
    assert large == pytest.approx(4 * small, rel=0.01)  # convolutions scale with the pixels


def test_models_verb_prints_every_fitting_architecture(tmp_path: Path, capsys) -> None:
    from medlandmark.cli import main

    preprocessed = tmp_path / "preprocessed"
    preprocessed.mkdir()
    (preprocessed / "plans.json").write_text((GOLDEN / "plans_afids.json").read_text())
    assert main(["models", str(tmp_path), "-c", "3d_fine"]) == 0
    printed = capsys.readouterr().err
    assert "unet" in printed and "80x80x80" in printed and " M " in printed
    assert main(["models", str(tmp_path), "-c", "nope"]) == 2
    assert "no configuration 'nope'" in capsys.readouterr().err
