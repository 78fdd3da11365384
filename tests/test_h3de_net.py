"""H3DE-Net: output contract for any input size, gradients, size, plan-driven construction."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medlandmark.models import network_for
from medlandmark.models.h3de_net import (
    CPU_WIDTH_MULTIPLIER,
    H3DENet,
    build_h3de,
    h3de_sizes,
)
from medlandmark.models.registry import available_models, build_model
from medlandmark.models.routing_attention import BiLevelRoutingAttention
from medlandmark.records.plan import Plan

GOLDEN_PLANS = Path(__file__).parent / "golden" / "plans_afids.json"
NUM_LANDMARKS = 5


def _cpu_net(seed: int = 0, **overrides) -> H3DENet:
    torch.manual_seed(seed)
    return build_h3de(NUM_LANDMARKS, 1, **h3de_sizes(**overrides))


def _parameter_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _expected_shapes(net: H3DENet, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    batch, sizes = shape[0], shape[2:]
    return [
        (batch, NUM_LANDMARKS, *(math.ceil(n / s) for n, s in zip(sizes, stride, strict=True)))
        for stride in net.output_strides
    ]


@pytest.mark.parametrize("shape", [(1, 1, 32, 40, 24), (1, 1, 33, 37, 29)])
def test_forward_backward_any_size(shape):
    net = _cpu_net()
    x = torch.randn(shape)
    outputs = net(x)
    assert net.output_strides == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert [tuple(o.shape) for o in outputs] == _expected_shapes(net, shape)
    assert outputs[0].shape[2:] == x.shape[2:]
    loss = sum(w * o.square().mean() for w, o in zip(net.output_weights, outputs, strict=True))
    loss.backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in net.stages[3].parameters())


@pytest.mark.parametrize("shape", [(2, 1, 9, 7, 5), (1, 1, 1, 40, 3)])
def test_tiny_and_flat_inputs_keep_their_size(shape):
    net = _cpu_net()
    outputs = net(torch.randn(shape))
    assert [tuple(o.shape) for o in outputs] == _expected_shapes(net, shape)
    assert all(torch.isfinite(o).all() for o in outputs)


def test_output_weights_and_deep_supervision_switch():
    net = _cpu_net()
    assert net.output_weights == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    keys = set(net.state_dict())
    single = _cpu_net(deep_supervision=False)
    assert single.output_strides == [(1, 1, 1)] and single.output_weights == [1.0]
    assert set(single.state_dict()) == keys  # checkpoints load in either mode
    single.load_state_dict(net.state_dict())
    net.eval(), single.eval()
    x = torch.randn(1, 1, 16, 24, 20)
    with torch.no_grad():
        [full] = single(x)
        torch.testing.assert_close(full, net(x)[0])


def fitted_regions(n_win, sizes) -> tuple[int, ...]:
    """The region grid clipped per axis so that no axis has more regions than voxels."""
    return tuple(max(1, min(int(n), int(s))) for n, s in zip(n_win, sizes, strict=True))


def test_planned_grid_on_small_maps_equals_the_clipped_grid():
    """Deep maps are smaller than the planned grid; empty regions are never routed to, so the
    output equals that of attention layers whose grid is clipped to each map."""
    torch.manual_seed(0)
    net = _cpu_net(n_win=[4, 4, 8]).eval()
    x = torch.randn(1, 1, 48, 20, 72)
    sizes = {}

    def record(module, inputs, _output):
        sizes[module] = tuple(inputs[0].shape[2:])

    hooks = [
        m.register_forward_hook(record)
        for m in net.modules()
        if isinstance(m, BiLevelRoutingAttention)
    ]
    with torch.no_grad():
        planned = net(x)[0]
    for hook in hooks:
        hook.remove()
    assert sizes[next(iter(sizes))] == (12, 5, 18) and (2, 1, 3) in sizes.values()
    for module, size in sizes.items():
        module.n_win = fitted_regions(module.n_win, size)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], planned)


def test_fitted_regions():
    assert fitted_regions((4, 4, 2), (8, 3, 1)) == (4, 3, 1)
    assert fitted_regions((4, 4, 2), (32, 32, 16)) == (4, 4, 2)


def test_per_stage_region_grids_and_bad_grids():
    net = _cpu_net(n_win=[[4, 4, 2], [2, 2, 2], [2, 2, 1], [1, 1, 1]])
    assert [s.planned_n_win for s in net.stages] == [(4, 4, 2), (2, 2, 2), (2, 2, 1), (1, 1, 1)]
    with pytest.raises(ValueError, match="n_win"):
        _cpu_net(n_win=[4, 4])
    with pytest.raises(ValueError, match="n_win"):
        _cpu_net(n_win=[[4, 4, 2]] * 3)


def test_eval_mode_is_deterministic():
    net = _cpu_net().eval()
    x = torch.randn(1, 1, 17, 23, 19)
    with torch.no_grad():
        first, second = net(x), net(x)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_full_size_matches_reference_parameter_count():
    net = build_h3de(14, 1, **h3de_sizes(width_multiplier=1.0))
    assert [s.blocks[0].attention.num_heads for s in net.stages] == [8, 16, 32, 64]
    assert [len(s.blocks) for s in net.stages] == [2, 2, 4, 2]
    assert [s.blocks[0].attention.topk for s in net.stages] == [1, 4, 16, 16]
    assert abs(_parameter_count(net) - 24.48e6) <= 0.01 * 24.48e6  # the official PBiFormer_Unet's
    assert isinstance(net.stem.conv2[-1], torch.nn.InstanceNorm3d)  # no GELU after the second conv
    assert [type(m).__name__ for m in net.stem.conv1] == ["Conv3d", "InstanceNorm3d", "GELU"]
    for stage in net.stages:  # each stage closes with the LayerNorm that feeds skip and next stage
        assert type(stage.norm).__name__ == "ChannelLayerNorm"
        assert stage.blocks[0].attention.scale == stage.blocks[0].attention.dim ** -0.5
    cpu = build_h3de(14, 1, **h3de_sizes(width_multiplier=CPU_WIDTH_MULTIPLIER))
    assert _parameter_count(cpu) < _parameter_count(net) / 8


def test_build_from_golden_plan():
    assert available_models()["h3de"] == (3,)
    config = Plan.model_validate_json(GOLDEN_PLANS.read_text()).configurations["3d_fullres"]
    sizes = config.architectures["h3de"]
    net = network_for("h3de", config, 32)
    widths = [round(w * sizes["width_multiplier"]) for w in sizes["widths"]]
    assert [s.blocks[0].attention.dim for s in net.stages] == widths
    assert all(s.planned_n_win == tuple(sizes["n_win"]) for s in net.stages)

    small = {**sizes, "width_multiplier": CPU_WIDTH_MULTIPLIER}
    small_net = build_model("h3de", 32, in_channels=2, spatial_dims=3, **small).eval()
    with torch.no_grad():
        outputs = small_net(torch.randn(1, 2, 32, 32, 32))
    assert outputs[0].shape == (1, 32, 32, 32, 32)
    assert len(outputs) == len(small_net.output_weights) == len(small_net.output_strides)


def test_rejects_2d_plans_and_2d_inputs():
    with pytest.raises(ValueError, match="only, the plan is 2D"):
        build_model("h3de", 3, spatial_dims=2, **h3de_sizes())
    with pytest.raises(ValueError, match="D, H, W"):
        _cpu_net()(torch.randn(1, 1, 32, 32))
