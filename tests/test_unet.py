"""U-Net baseline: built from the plan's topology, forward and backward in 2D and 3D."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medlandmark.models import build_model, count_parameters, forward_flops
from medlandmark.planning.planner import network_topology

GOLDEN = Path(__file__).parent / "golden"


def _config(patch: list[int], spacing: list[float]) -> dict:
    topology = network_topology(patch, spacing)
    return {"patch_size": topology["patch_size"], "architectures": {"unet": {
        "features_per_stage": [min(8 * 2**i, 64) for i in range(len(topology["strides"]))],
        "strides": topology["strides"], "kernel_sizes": topology["kernel_sizes"], "n_conv_per_stage": 2,
    }}}  # fmt: skip


@pytest.mark.parametrize(("patch", "spacing"), [([64, 48], [1.0, 1.0]), ([16, 32, 32], [3.0, 0.8, 0.8])])
def test_forward_backward_with_deep_supervision(patch: list[int], spacing: list[float]) -> None:
    torch.manual_seed(0)
    config = _config(patch, spacing)
    model = build_model("unet", config, num_landmarks=5)
    x = torch.randn(2, 1, *config["patch_size"])
    outputs = model(x)
    assert len(outputs) == len(model.output_strides) == len(model.output_weights)
    for heatmaps, stride in zip(outputs, model.output_strides, strict=True):
        expected = [n // s for n, s in zip(config["patch_size"], stride, strict=True)]
        assert list(heatmaps.shape) == [2, 5, *expected]
    assert model.output_strides[0] == (1,) * len(patch)
    assert sum(model.output_weights) == pytest.approx(1.0)
    assert model.output_weights == sorted(model.output_weights, reverse=True)  # 1/2^i
    levels = len(config["architectures"]["unet"]["strides"]) - 1
    assert len(outputs) == levels - 1  # the lowest decoder stage is not supervised: no head
    sum((w * o.square().mean()) for w, o in zip(model.output_weights, outputs, strict=True)).backward()
    for name, parameter in model.named_parameters():  # no unused parameters: DDP needs that
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_anisotropic_plan_does_not_pool_the_thick_axis_first() -> None:
    model = build_model("unet", _config([16, 32, 32], [3.0, 0.8, 0.8]), num_landmarks=2)
    assert model.output_strides[1] == (1, 2, 2)


def test_real_plan_sizes_and_flops_on_the_meta_device() -> None:
    plan = json.loads((GOLDEN / "plans_isbi2015.json").read_text())
    config = plan["configurations"]["2d_fine"]
    model = build_model("unet", config, num_landmarks=19)
    assert model.encoder[0][0][0].out_channels == config["architectures"]["unet"]["features_per_stage"][0]
    assert 10e6 < count_parameters(model) < 60e6
    small = forward_flops(build_model("unet", config, 19), (1, 1, 128, 128))
    large = forward_flops(build_model("unet", config, 19), (1, 1, 256, 256))
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
