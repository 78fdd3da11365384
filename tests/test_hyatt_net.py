"""HYATT-Net: output contract, sizes, parameter budget, CBAM, and the region-grid shortcut."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medlandmark.models import network_for
from medlandmark.models.hyatt_net import CBAM, HyattNet, build_hyatt, hyatt_sizes, stage_widths
from medlandmark.models.routing_attention import BiLevelRoutingAttention, GlobalAttention
from medlandmark.records.plan import Plan

PLANS = Path(__file__).resolve().parent / "golden" / "plans_isbi2015.json"
CPU_WIDTH = 0.25


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_model(patch=(128, 128), seed=0) -> HyattNet:
    torch.manual_seed(seed)
    return build_hyatt(19, 1, **hyatt_sizes(CPU_WIDTH))


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_forward_backward_shapes_and_finite_gradients(size):
    model = _cpu_model(size).train()
    x = torch.randn(1, 1, *size)
    outputs = model(x)
    assert len(outputs) == len(model.output_strides) == len(model.output_weights) == 3
    for out, stride in zip(outputs, model.output_strides, strict=True):
        assert out.shape == (1, 19, size[0] // stride[0], size[1] // stride[1])
    loss = sum(
        w * out.square().mean() for w, out in zip(model.output_weights, outputs, strict=True)
    )
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    assert any(param.grad.abs().sum() > 0 for param in model.stages[0].parameters())


def test_output_contract_attributes():
    model = _cpu_model()
    assert model.output_strides == [(1, 1), (2, 2), (4, 4)]
    assert model.output_weights == [3000.0, 3000.0, 1000.0]
    assert model.output_sigma_voxels([5.0, 4.0]) == [(5.0, 4.0), (2.5, 2.0), (2.5, 2.0)]
    in_input_pixels = [
        s[0] * stride[0]
        for s, stride in zip(
            model.output_sigma_voxels([4.0, 4.0]), model.output_strides, strict=True
        )
    ]
    assert in_input_pixels == [4.0, 4.0, 8.0]  # paper: 4 px full-res, 2 px at strides 2 and 4


@pytest.mark.parametrize("size", [(50, 70), (33, 97)])
def test_sizes_not_divisible_by_32_are_padded_and_cropped(size):
    model = _cpu_model(size).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 1, *size))
    for out, stride in zip(outputs, model.output_strides, strict=True):
        assert out.shape[2:] == tuple(math.ceil(n / s) for n, s in zip(size, stride, strict=True))
    assert all(torch.isfinite(out).all() for out in outputs)


OFFICIAL_PARAMETERS = 77.24e6  # ECNUACRush/HYATT-Net, ISBI 2015 config: those that reach an output


def test_full_width_matches_the_official_network_block_by_block():
    """The paper's width, on the official RGB input with ISBI's 19 landmarks: the parameter count
    of the official network's output-reaching modules within 1 %, and its block order."""
    model = build_hyatt(19, 3, **hyatt_sizes(1.0))
    assert model.widths == [64, 128, 320, 512, 1024]
    assert abs(_n_params(model) - OFFICIAL_PARAMETERS) <= 0.01 * OFFICIAL_PARAMETERS
    for stage, width in zip(model.stages, model.widths, strict=True):  # embed -> BiFormer -> ARM
        conv = stage.embed  # the official BatchNorm after it is never applied
        assert conv.kernel_size == (4, 4) and conv.stride == (2, 2) and conv.bias is not None
        assert conv.out_channels == width
        assert [type(m).__name__ for m in stage.children()] == [
            "Conv2d",
            "Sequential",
            "AttentionResidualModule",
        ]
    attention = [stage.blocks[0].attention for stage in model.stages]
    assert [type(a).__name__ for a in attention] == ["BiLevelRoutingAttention"] * 4 + [
        "GlobalAttention"
    ]
    assert [a.topk for a in attention[:4]] == [1, 4, 8, 16] and attention[4].num_heads == 8
    assert isinstance(model.neck.smooth, torch.nn.Conv2d)  # a plain conv, as the official neck's
    for head in (model.head4, model.head2, model.ffcm.head):  # conv3x3 -> ReLU -> conv1x1
        assert [type(m).__name__ for m in head] == ["Conv2d", "ReLU", "Conv2d"]
        assert head[0].kernel_size == (3, 3) and head[2].kernel_size == (1, 1)
    assert model.ffcm.head[0].in_channels == model.ffcm.head[0].out_channels == 256 + 32 + 19  # 307
    assert [type(m).__name__ for m in model.ffcm.image] == ["Conv2d", "BatchNorm2d", "ReLU"]


def test_cpu_variant_is_under_6m_parameters():
    # 5.22 M since stage 2 is one head wider than stage 1 at width 0.25 (4.98 M before)
    assert _n_params(_cpu_model()) < 6e6


def test_stage_widths_are_multiples_of_head_dim():
    assert stage_widths(0.5, 32) == [32, 64, 160, 256, 512]
    assert all(w % 32 == 0 and w >= 32 for w in stage_widths(0.1, 32))
    for multiplier in (0.1, 0.25, 0.5, 1.0):  # every stage wider than the one before
        widths = stage_widths(multiplier, 32)
        assert all(a < b for a, b in zip(widths, widths[1:], strict=False)), (multiplier, widths)
    assert stage_widths(0.25, 32) == [32, 64, 96, 128, 256]
    assert stage_widths(1.0, 32) == [64, 128, 320, 512, 1024]  # the paper's


def test_build_from_real_plan_via_registry():
    config = Plan.model_validate_json(PLANS.read_text()).configurations["2d_coarse"]
    model = network_for("hyatt", config, 19)
    arch = config.architectures["hyatt"]
    assert model.widths == stage_widths(arch["width_multiplier"], arch["head_dim"])
    for stage, n_win, topk, ratio, width in zip(
        model.stages, arch["n_win"], arch["topk"], arch["mlp_ratios"], model.widths, strict=True
    ):
        block = stage.blocks[0]
        if topk == -2:  # the last stage: global attention, 8 heads, as the official code
            assert isinstance(block.attention, GlobalAttention) and block.attention.num_heads == 8
            assert block.attention.qkv.bias is None
        else:
            assert block.attention.n_win == (n_win, n_win)
            assert block.attention.topk == topk
            assert block.attention.num_heads == width // arch["head_dim"]
            assert block.attention.scale == width**-0.5  # the official dim^-0.5
        assert block.mlp.expand.out_channels == int(width * ratio)
    rates = [block.drop_path.rate for stage in model.stages for block in stage.blocks]
    assert rates == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    model.eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 1, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [(1, 19, 64, 96), (1, 19, 32, 48), (1, 19, 16, 24)]


def test_bad_plan_settings_are_rejected():
    with pytest.raises(ValueError, match="n_win"):
        build_hyatt(19, 1, **hyatt_sizes(CPU_WIDTH, n_win=[16, 16, 8]))
    with pytest.raises(ValueError, match="unknown HYATT-Net settings"):
        build_hyatt(19, 1, **hyatt_sizes(CPU_WIDTH, windows=4))


def test_cbam_weights_and_output():
    torch.manual_seed(0)
    cbam = CBAM(32)
    x = torch.randn(2, 32, 9, 11) * 3
    channel = cbam.channel_weights(x)
    assert channel.shape == (2, 32, 1, 1)
    assert ((channel > 0) & (channel < 1)).all()
    assert channel.std() > 0
    scaled = x * channel
    spatial = cbam.spatial_weights(scaled)
    assert spatial.shape == (2, 1, 9, 11)
    assert ((spatial > 0) & (spatial < 1)).all()
    out = cbam(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, scaled * spatial)
    assert cbam.mlp[0].out_channels == 32 // 16


def test_eval_mode_is_deterministic():
    model = _cpu_model((32, 64)).eval()
    x = torch.randn(2, 1, 32, 64)
    with torch.no_grad():
        first, second = model(x), model(x)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("topk", [-1, 16, 4])
def test_region_grid_larger_than_the_map_equals_clipped_grid(topk):
    """n_win is used as planned: on a map smaller than the grid, regions are single pixels and
    empty padded regions are never attended, i.e. exactly n_win clipped to the map side."""
    torch.manual_seed(0)
    planned = BiLevelRoutingAttention(64, 2, 8, topk, 2, kv_pool=4).double()
    clipped = BiLevelRoutingAttention(64, 2, (4, 6), topk, 2, kv_pool=4).double()
    clipped.load_state_dict(planned.state_dict())
    x = torch.randn(1, 64, 4, 6, dtype=torch.float64)
    if topk == 4:  # ties in the routing would make the top-k choice ambiguous: break them
        x = x + torch.linspace(0, 1, 24, dtype=torch.float64).view(1, 1, 4, 6)
    torch.testing.assert_close(planned(x), clipped(x))


def test_cbam_channel_attention_uses_the_max_descriptor():
    torch.manual_seed(0)
    cbam = CBAM(32)
    flat = torch.zeros(1, 32, 4, 4)
    peaked = flat.clone()
    bumps = torch.rand(32) * 5
    peaked[0, :, 0, 0], peaked[0, :, 0, 1] = bumps, -bumps  # same channel means, larger maxima
    assert torch.equal(flat.mean((2, 3)), peaked.mean((2, 3)))
    assert not torch.allclose(cbam.channel_weights(flat), cbam.channel_weights(peaked))
