"""Bi-level routing attention equals plain references: dense, explicitly masked, pooled."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medlandmark.models.routing_attention import BiLevelRoutingAttention


def _module(dim, heads, n_win, topk, spatial_dims, kv_pool=None, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    module = BiLevelRoutingAttention(dim, heads, n_win, topk, spatial_dims, kv_pool=kv_pool)
    with torch.no_grad():  # non-trivial biases so that padded tokens would show if they leaked
        for param in module.parameters():
            param.normal_(0.0, 0.3)
    return module.to(dtype)


def _input(shape, seed=1, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype)


def _project(module, x):
    """Tokens (B, N, C) of q, k, v and V as an image, straight from the unpadded map."""
    tokens = x.flatten(2).transpose(1, 2)
    q, k, v = F.linear(tokens, module.qkv.weight, module.qkv.bias).chunk(3, dim=-1)
    v_image = v.transpose(1, 2).reshape(x.shape)
    return q, k, v, v_image


def _heads(t, heads):
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attention(module, x, q, k, v, allowed):
    """Softmax attention of q over k/v where ``allowed`` (B, Nq, Nk) or None, + LePE, out proj."""
    heads = module.num_heads
    logits = _heads(q, heads) @ _heads(k, heads).transpose(-1, -2) * module.scale
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    out = (logits.softmax(-1) @ _heads(v, heads)).transpose(1, 2).flatten(2)
    lepe = module.lepe(_project(module, x)[3]).flatten(2).transpose(1, 2)
    y = F.linear(out + lepe, module.proj.weight, module.proj.bias)
    return y.transpose(1, 2).reshape(x.shape)


def dense_reference(module, x):
    """Plain multi-head attention over all tokens with the module's weights."""
    q, k, v, _ = _project(module, x)
    return _attention(module, x, q, k, v, None)


def _region_sizes(sizes, n_win):
    return [math.ceil(s / n) for s, n in zip(sizes, n_win, strict=True)]


def _token_regions(sizes, n_win):
    """(N,) region id of every token of the unpadded map (row-major over the region grid)."""
    region = _region_sizes(sizes, n_win)
    coords = torch.meshgrid(*[torch.arange(s) for s in sizes], indexing="ij")
    ids = torch.zeros(sizes, dtype=torch.long)
    for c, r, n in zip(coords, region, n_win, strict=True):
        ids = ids * n + c // r
    return ids.flatten()


def _routing(q, k, regions, n_regions, topk):
    """(B, R, R) bool: query region -> chosen key regions, from means over each region's tokens."""
    one_hot = F.one_hot(regions, n_regions).to(q.dtype)  # (N, R)
    counts = one_hot.sum(0)
    q_r = (one_hot.T @ q) / counts.clamp_min(1)[:, None]
    k_r = (one_hot.T @ k) / counts.clamp_min(1)[:, None]
    affinity = (q_r @ k_r.transpose(1, 2)).masked_fill(counts == 0, float("-inf"))
    chosen = affinity.topk(min(topk, n_regions), dim=-1).indices
    return torch.zeros_like(affinity, dtype=torch.bool).scatter_(-1, chosen, True)


def routed_reference(module, x, n_win, topk):
    """Full attention with an explicit token mask: j visible to i iff region(j) routed from i's."""
    q, k, v, _ = _project(module, x)
    regions = _token_regions(x.shape[2:], n_win)
    chosen = _routing(q, k, regions, math.prod(n_win), topk)
    allowed = chosen[:, regions][:, :, regions]
    return _attention(module, x, q, k, v, allowed)


def _pooled_cells(t_image, sizes, n_win, cells):
    """Per region, its keys/values adaptive-average-pooled over valid voxels only.

    Returns (B, R * cells, C) values, (R * cells,) region id of each cell, (R * cells,) validity.
    """
    region = _region_sizes(sizes, n_win)
    padded = [n * r for n, r in zip(n_win, region, strict=True)]
    pads = [p for s, P in zip(reversed(sizes), reversed(padded), strict=True) for p in (0, P - s)]
    values = F.pad(t_image, pads)
    mask = F.pad(torch.ones((1, 1, *sizes), dtype=t_image.dtype), pads)
    pool = F.adaptive_avg_pool2d if len(sizes) == 2 else F.adaptive_avg_pool3d
    out, cell_region, cell_valid = [], [], []
    for rid, index in enumerate(
        torch.cartesian_prod(*[torch.arange(n) for n in n_win]).view(-1, len(sizes))
    ):
        box = (slice(None), slice(None)) + tuple(
            slice(int(i) * r, (int(i) + 1) * r) for i, r in zip(index, region, strict=True)
        )
        total = pool(values[box] * mask[box], cells).flatten(2)
        count = pool(mask[box], cells).flatten(2)
        out.append(total / count.clamp_min(1e-12))
        cell_region += [rid] * count.shape[-1]
        cell_valid.append(count[0, 0] > 0)
    return torch.cat(out, -1).transpose(1, 2), torch.tensor(cell_region), torch.cat(cell_valid)


def pooled_reference(module, x, n_win, topk, kv_pool):
    """Routed attention over region-pooled keys/values (valid-voxel averages), explicit mask."""
    q, k, v, v_image = _project(module, x)
    sizes = list(x.shape[2:])
    regions = _token_regions(sizes, n_win)
    chosen = _routing(q, k, regions, math.prod(n_win), topk)
    cells = [min(p, r) for p, r in zip(kv_pool, _region_sizes(sizes, n_win), strict=True)]
    k_image = k.transpose(1, 2).reshape(x.shape)
    k_cells, cell_region, cell_valid = _pooled_cells(k_image, sizes, n_win, cells)
    v_cells, _, _ = _pooled_cells(v_image, sizes, n_win, cells)
    allowed = chosen[:, regions][:, :, cell_region] & cell_valid
    return _attention(module, x, q, k_cells, v_cells, allowed)


@pytest.mark.parametrize(
    ("shape", "n_win", "heads", "topk"),
    [
        ((2, 8, 8, 12), (2, 3), 2, 6),  # divisible, 2D
        ((1, 8, 7, 11), (2, 3), 2, -1),  # padding on both axes
        ((1, 8, 9, 5), 4, 1, 100),  # topk beyond the region count; fully padded regions
        ((2, 8, 4, 6, 4), (2, 3, 2), 2, 12),  # divisible, 3D
        ((1, 8, 5, 7, 6), (2, 3, 4), 4, -1),  # padding on all three axes
        ((2, 8, 9, 5), 4, 2, 9),  # routed: topk = the 9 non-empty regions of 16
    ],
)
def test_all_regions_equal_dense_attention(shape, n_win, heads, topk):
    module = _module(shape[1], heads, n_win, topk, len(shape) - 2)
    x = _input(shape)
    expected = dense_reference(module, x)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "n_win", "topk"),
    [
        ((2, 8, 12, 12), (3, 3), 2),
        ((3, 8, 13, 10), (3, 4), 3),  # r = (5, 3): padding on both axes
        ((2, 8, 9, 5), 4, 3),  # r = (3, 2): 7 of the 16 regions are fully padded
        ((2, 8, 6, 8, 4), (2, 2, 2), 3),
        ((2, 8, 7, 5, 9), (2, 3, 2), 4),  # padding on all three axes
    ],
)
def test_routed_attention_equals_masked_reference(shape, n_win, topk):
    n_win_tuple = (n_win,) * (len(shape) - 2) if isinstance(n_win, int) else n_win
    module = _module(shape[1], 2, n_win, topk, len(shape) - 2, seed=topk)
    x = _input(shape, seed=topk + 10)
    expected = routed_reference(module, x, n_win_tuple, topk)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "n_win", "topk", "kv_pool"),
    [
        ((2, 8, 16, 16), (2, 2), 2, (4, 4)),  # divisible region and cells (fast path)
        ((2, 8, 15, 10), (3, 2), 2, (2, 2)),  # r = (5, 5): overlapping adaptive bins
        ((2, 8, 13, 11), (3, 3), 3, (2, 3)),  # padding: cells average valid voxels only
        ((2, 8, 15, 12), (2, 2), 2, (2, 3)),  # padded, cells dividing the regions
        ((1, 8, 9, 6), (4, 2), 1, (4, 4)),  # cells clipped to the region size; empty regions
        ((2, 8, 7, 6, 9), (2, 2, 3), 2, (2, 2, 2)),  # 3D with padding
    ],
)
def test_pooled_keys_values_equal_reference(shape, n_win, topk, kv_pool):
    module = _module(shape[1], 2, n_win, topk, len(shape) - 2, kv_pool=kv_pool, seed=3)
    x = _input(shape, seed=4)
    expected = pooled_reference(module, x, n_win, topk, kv_pool)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-6)


def test_gradients_reach_every_parameter_and_the_input():
    module = _module(8, 2, (2, 3), 2, 2, kv_pool=2, dtype=torch.float32)
    x = _input((2, 8, 11, 13), dtype=torch.float32).requires_grad_()
    module(x).square().sum().backward()
    for name, param in [*module.named_parameters(), ("input", x)]:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_gradients_match_the_masked_reference():
    module = _module(8, 2, (2, 2, 2), 3, 3, seed=5)
    x = _input((2, 8, 5, 6, 7), seed=6).requires_grad_()
    grad_ours = torch.autograd.grad(module(x).sin().sum(), [x, *module.parameters()])
    reference = routed_reference(module, x, (2, 2, 2), 3).sin().sum()
    grad_ref = torch.autograd.grad(reference, [x, *module.parameters()])
    for ours, ref in zip(grad_ours, grad_ref, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_gradients_match_the_pooled_reference_in_2d():
    # 37 rows: several strips of the CPU LePE weight gradient, the last one partly padded
    module = _module(8, 2, (4, 3), 2, 2, kv_pool=(2, 3), seed=7)
    x = _input((2, 8, 37, 10), seed=8).requires_grad_()
    grad_ours = torch.autograd.grad(module(x).sin().sum(), [x, *module.parameters()])
    reference = pooled_reference(module, x, (4, 3), 2, (2, 3)).sin().sum()
    grad_ref = torch.autograd.grad(reference, [x, *module.parameters()])
    for ours, ref in zip(grad_ours, grad_ref, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_bfloat16_is_close_to_float32():
    module = _module(16, 2, 2, 2, 2, kv_pool=2, dtype=torch.float32)
    x = _input((1, 16, 16, 12), dtype=torch.float32)
    with torch.no_grad():
        expected = module(x)
        low = module.to(torch.bfloat16)(x.bfloat16())
    assert low.dtype == torch.bfloat16
    error = (low.float() - expected).abs().max() / expected.abs().max()
    assert error < 0.05
    x_low = x.bfloat16().requires_grad_()
    module(x_low).float().square().sum().backward()
    assert torch.isfinite(x_low.grad.float()).all() and x_low.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad.float()).all() for p in module.parameters())


@pytest.mark.parametrize("shape", [(1, 8, 5, 7, 9), (2, 8, 3, 11, 5)])
def test_odd_3d_sizes_come_back_uncropped_on_every_axis(shape):
    module = _module(8, 2, (2, 2, 2), 2, 3, dtype=torch.float32)
    x = _input(shape, dtype=torch.float32)
    assert module(x).shape == x.shape


def test_rejects_wrong_input_shape():
    module = _module(8, 2, 2, 1, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected"):
        module(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="expected"):
        module(torch.zeros(1, 8, 8, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topk": 0}, "topk"),
        ({"num_heads": 3}, "divisible"),
        ({"n_win": (2, 2, 2)}, "n_win"),
        ({"kv_pool": 0}, "kv_pool"),
    ],
)
def test_rejects_bad_settings(kwargs, message):
    settings = {"dim": 8, "num_heads": 2, "n_win": 2, "topk": 1, "spatial_dims": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        BiLevelRoutingAttention(**settings)
