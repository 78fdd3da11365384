"""Bi-level routing attention (BRA, from BiFormer) for 2D and 3D maps, exact for any input size.

Axis order: ``n_win`` and ``kv_pool`` are given per spatial axis in the tensor's own order, entry
``i`` for ``x.shape[2 + i]``: (H, W) in 2D, (D, H, W) in 3D. H3DE-Net's (4, 4, 2) grid on a
(B, C, 32, 32, 16) map thus gives 8x8x8-voxel regions.

Semantics. Every axis is padded up to a multiple of its region count (region size
ceil(size / n_win)) and cropped back afterwards; padded voxels are never keys, never counted in
region means or pooled cells, and a region holding no valid voxel is never routed to. Routing is
shared by all heads (BiFormer's choice): region-mean q and k over all channels (detached),
affinity q_r . k_r^T, hard top-k. Token logits are scaled by dim^-0.5 (the channels of all heads,
as BiFormer's, HYATT-Net's and H3DE-Net's code does, sharper logits than head_dim^-0.5 would
give; the ``scale`` attribute changes it). Pooled keys/values (``kv_pool``) are adaptive-average-pooling
bins of each region (``F.adaptive_avg_pool`` bins; cells clipped to the region size). LePE is a
depthwise conv of V over the unpadded map, added before the output projection.

Implementation (same result, less work; measured by benchmarks/bra.py): query regions go into
the batch axis of one ``scaled_dot_product_attention`` call, (B * regions, heads, tokens, d),
with routed keys/values gathered by ``index_select`` and a key mask only when padding exists;
pooled keys/values are projected after pooling (averaging commutes with the affine projection),
so K is never computed at full resolution; and on CPU the 2D LePE weight gradient is computed
over row strips, which oneDNN does about twice as fast as one large image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_CONVS = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FNS = {2: F.conv2d, 3: F.conv3d}
_WEIGHT_GRADS = {2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
_STRIP = 16  # rows per strip in the 2D LePE weight gradient on CPU (see _strip_weight_grad)


def _per_axis(value: int | tuple[int, ...], spatial_dims: int, name: str) -> tuple[int, ...]:
    """``value`` as one positive int per spatial axis."""
    values = (value,) * spatial_dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != spatial_dims or any(v < 1 for v in values):
        raise ValueError(
            f"{name} must be a positive int or {spatial_dims} positive ints, got {value!r}"
        )
    return values


def _interleave(first: tuple[int, ...], second: tuple[int, ...]) -> tuple[int, ...]:
    """(a1, b1, a2, b2, ...) from (a1, a2, ...) and (b1, b2, ...)."""
    return tuple(v for pair in zip(first, second, strict=True) for v in pair)


@dataclass(frozen=True)
class RegionGrid:
    """How one input size is cut into regions: counts, region size and pooled cells per axis."""

    sizes: tuple[int, ...]
    n_win: tuple[int, ...]
    region: tuple[int, ...]
    cells: tuple[int, ...] | None

    @classmethod
    def for_size(
        cls, sizes: tuple[int, ...], n_win: tuple[int, ...], kv_pool: tuple[int, ...] | None
    ) -> RegionGrid:
        """The grid for a map of ``sizes`` voxels; pooled cells are clipped to the region size."""
        region = tuple(-(-s // n) for s, n in zip(sizes, n_win, strict=True))
        if kv_pool is None:
            return cls(tuple(sizes), tuple(n_win), region, None)
        cells = tuple(min(p, r) for p, r in zip(kv_pool, region, strict=True))
        return cls(tuple(sizes), tuple(n_win), region, cells)

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(n * r for n, r in zip(self.n_win, self.region, strict=True))

    @property
    def needs_padding(self) -> bool:
        return self.padded != self.sizes

    @property
    def n_regions(self) -> int:
        return math.prod(self.n_win)

    @property
    def tokens(self) -> int:
        return math.prod(self.region)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """Zero-pad the trailing spatial axes of ``t`` (channels-first) up to the padded size."""
        pads = []
        for size, padded in zip(reversed(self.sizes), reversed(self.padded), strict=True):
            pads += [0, padded - size]
        return F.pad(t, pads)

    def token_valid(self, device: torch.device) -> torch.Tensor:
        """(regions, tokens) bool: which voxels of each region lie inside the unpadded map."""
        nd = len(self.sizes)
        valid = torch.ones((1,) * (2 * nd), dtype=torch.bool, device=device)
        for axis, (size, n, r) in enumerate(zip(self.sizes, self.n_win, self.region, strict=True)):
            start = torch.arange(n, device=device)[:, None] * r
            axis_valid = (start + torch.arange(r, device=device)[None, :]) < size
            shape = [1] * (2 * nd)
            shape[axis], shape[nd + axis] = n, r
            valid = valid & axis_valid.view(shape)
        return valid.reshape(self.n_regions, self.tokens)


def _to_regions(x: torch.Tensor, grid: RegionGrid) -> torch.Tensor:
    """(B, C, *sizes) -> (B * regions * tokens, C), zero-padded, region-major."""
    if grid.needs_padding:
        x = grid.pad(x)
    batch, dim = x.shape[:2]
    nd = len(grid.sizes)
    split = x.reshape((batch, dim) + _interleave(grid.n_win, grid.region))
    order = (0,) + tuple(2 + 2 * a for a in range(nd)) + tuple(3 + 2 * a for a in range(nd))
    return split.permute(order + (1,)).reshape(-1, dim)


def _image_order(t: torch.Tensor, grid: RegionGrid) -> torch.Tensor:
    """(B, regions, tokens, C) -> a (B, n1, r1, n2, r2, ..., C) view in image order."""
    nd = len(grid.sizes)
    t = t.reshape((t.shape[0],) + grid.n_win + grid.region + (t.shape[-1],))
    order = tuple(v for a in range(nd) for v in (1 + a, 1 + nd + a))
    return t.permute((0,) + order + (1 + 2 * nd,))


def _to_image(t: torch.Tensor, grid: RegionGrid) -> torch.Tensor:
    """(B, regions, tokens, C) -> (B, *sizes, C) channels-last image, cropped to the valid map."""
    image = _image_order(t, grid).reshape((t.shape[0],) + grid.padded + (t.shape[-1],))
    if grid.needs_padding:
        image = image[(slice(None),) + tuple(slice(0, s) for s in grid.sizes)]
    return image


def _region_means(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, regions, tokens, C) -> (B, regions, C) means over each region's valid tokens."""
    if valid is None:
        return t.mean(2)
    weights = valid / valid.sum(-1, keepdim=True).clamp_min(1)
    return (weights.to(t.dtype)[:, None, :] @ t).squeeze(2)


def _bins(cells: int, length: int) -> torch.Tensor:
    """(cells, length) 0/1 membership of adaptive-average-pooling bins along one axis."""
    idx = torch.arange(length)
    start = torch.tensor([(j * length) // cells for j in range(cells)])
    stop = torch.tensor([-((-(j + 1) * length) // cells) for j in range(cells)])
    return ((idx[None, :] >= start[:, None]) & (idx[None, :] < stop[:, None])).double()


def _cell_weights(
    grid: RegionGrid, valid: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Averaging weights (regions or 1, cells, tokens) over valid tokens, and cell validity."""
    member = _bins(grid.cells[0], grid.region[0])
    for cells, length in zip(grid.cells[1:], grid.region[1:], strict=True):
        member = torch.kron(member, _bins(cells, length))
    member = member.to(device)[None]
    if valid is None:
        return (member / member.sum(-1, keepdim=True)).to(dtype), None
    member = member * valid[:, None, :]
    counts = member.sum(-1, keepdim=True)
    return (member / counts.clamp_min(1)).to(dtype), counts[..., 0] > 0


def _pool_regions(
    x: torch.Tensor, grid: RegionGrid, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, regions, tokens, C) -> (B, regions, cells, C) adaptive averages over valid tokens."""
    batch, regions, _, dim = x.shape
    steps = tuple(r // c for r, c in zip(grid.region, grid.cells, strict=True))
    if valid is None and math.prod(steps) * math.prod(grid.cells) == grid.tokens:
        split = x.reshape((batch * regions,) + _interleave(grid.cells, steps) + (dim,))
        dims = tuple(2 + 2 * a for a in range(len(steps)))
        return split.mean(dims).view(batch, regions, -1, dim), None
    weights, cell_valid = _cell_weights(grid, valid, x.device, x.dtype)
    return weights @ x, cell_valid


@torch.no_grad()
def route(
    q_means: torch.Tensor, k_means: torch.Tensor, region_valid: torch.Tensor | None, topk: int
) -> torch.Tensor:
    """(B, regions, topk) indices of the regions each query region attends (hard, detached)."""
    affinity = q_means.float() @ k_means.float().transpose(1, 2)
    if region_valid is not None:
        affinity.masked_fill_(~region_valid, float("-inf"))
    return affinity.topk(topk, dim=-1).indices


def _strip_windows(x: torch.Tensor, kernel: tuple[int, ...], strip: int) -> torch.Tensor:
    """(B, C, L, *rest) -> (B * strips, C, strip + k - 1, *padded rest) channels-last windows.

    Strip s holds rows s * strip - k // 2 ... of the zero-padded map (a halo of k - 1 rows);
    filled row offset by row offset, so the padded map itself is never built.
    """
    batch, channels, length = x.shape[:3]
    halo = [k // 2 for k in kernel]
    n_strips = -(-length // strip)
    x_last = x.movedim(1, -1)  # (B, L, *rest, C)
    rest = tuple(slice(h, h + s) for h, s in zip(halo[1:], x.shape[3:], strict=True))
    padded_rest = tuple(s + 2 * h for h, s in zip(halo[1:], x.shape[3:], strict=True))
    windows = x.new_empty((batch, n_strips, strip + kernel[0] - 1) + padded_rest + (channels,))
    for axis, h in enumerate(halo[1:]):  # zero the halo of the other axes
        index = (slice(None),) * (3 + axis)
        windows[index + (slice(0, h),)] = 0
        windows[index + (slice(h + x.shape[3 + axis], None),)] = 0
    for offset in range(strip + kernel[0] - 1):
        first_row = offset - halo[0]  # row held by strip 0 at this offset
        lo = max(0, -(first_row // strip))  # first strip whose row is >= 0
        hi = max(lo, min(n_strips, -((first_row - length) // strip)))  # ... and < length
        windows[:, :lo, offset] = 0
        windows[:, hi:, offset] = 0
        if hi > lo:
            start = first_row + lo * strip
            source = x_last[:, start : start + (hi - lo - 1) * strip + 1 : strip]
            windows[(slice(None), slice(lo, hi), offset) + rest] = source
    shape = (batch * n_strips, strip + kernel[0] - 1) + padded_rest + (channels,)
    return windows.view(shape).movedim(-1, 1)


def _strip_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, weight_shape: torch.Size, strip: int = _STRIP
) -> torch.Tensor:
    """Depthwise-conv weight gradient computed over strips of ``strip`` rows (first axis).

    The same sum as one big call, cut into a batch of overlapping strips (halo k - 1), which
    oneDNN's CPU kernel handles several times faster than a single large image.
    """
    nd = x.dim() - 2
    batch, channels, length = x.shape[:3]
    n_strips = -(-length // strip)
    windows = _strip_windows(x, tuple(weight_shape[2:]), strip)
    grad_last = grad.movedim(1, -1)
    if n_strips * strip > length:
        grad_last = F.pad(grad_last, [0, 0] * nd + [0, n_strips * strip - length])
    grad_strips = grad_last.reshape((batch * n_strips, strip) + grad_last.shape[2:])
    grad_strips = grad_strips.movedim(-1, 1).contiguous(memory_format=_CHANNELS_LAST[nd])
    return _WEIGHT_GRADS[nd](windows, weight_shape, grad_strips, groups=channels)


class _DepthwiseConvCPU(torch.autograd.Function):
    """Depthwise 'same' convolution (odd kernel) with a strip-wise weight gradient (CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        padding = [k // 2 for k in weight.shape[2:]]
        return _CONV_FNS[x.dim() - 2](x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        nd = x.dim() - 2
        grad = grad.contiguous(memory_format=_CHANNELS_LAST[nd])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # stride 1, 'same': the transpose is the flipped kernel
            flipped = weight.flip(tuple(range(2, nd + 2)))
            padding = [k // 2 for k in weight.shape[2:]]
            grad_x = _CONV_FNS[nd](grad, flipped, padding=padding, groups=x.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = _strip_weight_grad(x, grad, weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0,) + tuple(range(2, nd + 2)))
        return grad_x, grad_weight, grad_bias


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention on channels-first maps (B, C, *spatial) -> same shape.

    Keys/values of each region are optionally average-pooled to ``kv_pool`` cells per axis;
    ``topk`` = -1 or >= the number of regions means every region (plain attention). The output
    is channels-last in memory (a permuted view), like the BiFormer block's.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int | tuple[int, ...],
        topk: int,
        spatial_dims: int,
        kv_pool: int | tuple[int, ...] | None = None,
        qkv_bias: bool = True,
        lepe_kernel: int = 5,
    ) -> None:
        super().__init__()
        if spatial_dims not in _CONVS:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if topk == 0 or topk < -1:
            raise ValueError(f"topk must be -1 (all regions) or >= 1, got {topk}")
        self.dim, self.num_heads, self.topk, self.spatial_dims = dim, num_heads, topk, spatial_dims
        self.head_dim = dim // num_heads
        self.scale = dim**-0.5  # the official codes'; set the attribute for another
        self.n_win = _per_axis(n_win, spatial_dims, "n_win")
        self.kv_pool = None if kv_pool is None else _per_axis(kv_pool, spatial_dims, "kv_pool")
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = _CONVS[spatial_dims](dim, dim, lepe_kernel, padding="same", groups=dim)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}, "
            f"kv_pool={self.kv_pool}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"expected (B, {self.dim}, *{self.spatial_dims} spatial axes), got {tuple(x.shape)}"
            )
        grid = RegionGrid.for_size(tuple(x.shape[2:]), self.n_win, self.kv_pool)
        valid = grid.token_valid(x.device) if grid.needs_padding else None
        x_regions = _to_regions(x, grid).view(-1, grid.n_regions, grid.tokens, self.dim)
        q = self._linear(x_regions, 0)
        if grid.cells is None:
            k, v = self._linear(x_regions, 1), self._linear(x_regions, 2)
            v_image = _to_image(v, grid).movedim(-1, 1)
            key_valid = valid
        else:  # averaging commutes with the affine projection: project the pooled x
            x_cells, key_valid = _pool_regions(x_regions, grid, valid)
            k, v = self._linear(x_cells, 1), self._linear(x_cells, 2)
            tokens = x.flatten(2).transpose(1, 2)
            v_image = self._linear(tokens, 2).view((x.shape[0],) + grid.sizes + (self.dim,))
            v_image = v_image.movedim(-1, 1)
        lepe = self._lepe(v_image)
        topk = grid.n_regions if self.topk == -1 else min(self.topk, grid.n_regions)
        routed = None
        if topk < grid.n_regions:
            with torch.no_grad():  # region means of q and k = projections of region-mean x
                x_means = _region_means(x_regions, valid)
                q_means, k_means = self._linear(x_means, 0), self._linear(x_means, 1)
            region_valid = None if valid is None else valid.any(-1)
            routed = route(q_means, k_means, region_valid, topk)
        out = self._attend(q, k, v, key_valid, routed)
        return self._merge(out, lepe, grid)

    def _linear(self, tokens: torch.Tensor, which: int) -> torch.Tensor:
        """Projection ``which`` (0 = q, 1 = k, 2 = v) of channels-last tokens."""
        weight = self.qkv.weight[which * self.dim : (which + 1) * self.dim]
        bias = self.qkv.bias
        bias = None if bias is None else bias[which * self.dim : (which + 1) * self.dim]
        return F.linear(tokens, weight, bias)

    def _lepe(self, v_image: torch.Tensor) -> torch.Tensor:
        """Depthwise conv of V (B, C, *sizes) over the valid map, as (B, *sizes, C)."""
        v_image = v_image.contiguous(memory_format=_CHANNELS_LAST[self.spatial_dims])
        weight, bias = self.lepe.weight, self.lepe.bias
        odd = all(k % 2 for k in weight.shape[2:])
        if v_image.device.type == "cpu" and self.spatial_dims == 2 and odd:
            return _DepthwiseConvCPU.apply(v_image, weight, bias).movedim(1, -1)
        return self.lepe(v_image).movedim(1, -1)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_valid: torch.Tensor | None,
        routed: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token attention through SDPA; (B, regions, tokens, C)."""
        batch, regions, tokens, dim = q.shape
        heads, head_dim = self.num_heads, self.head_dim
        kv_tokens = k.shape[2]
        if routed is None:
            rows, keys = batch, regions * kv_tokens
            mask = None if key_valid is None else key_valid.reshape(1, 1, 1, keys)
        else:
            rows, keys = batch * regions, routed.shape[-1] * kv_tokens
            offsets = torch.arange(batch, device=q.device)[:, None, None] * regions
            flat = (routed + offsets).reshape(-1)
            k = k.reshape(batch * regions, kv_tokens, dim).index_select(0, flat)
            v = v.reshape(batch * regions, kv_tokens, dim).index_select(0, flat)
            mask = None
            if key_valid is not None:
                mask = key_valid.index_select(0, routed.reshape(-1)).view(rows, 1, 1, keys)
        out = F.scaled_dot_product_attention(
            q.reshape(rows, -1, heads, head_dim).transpose(1, 2),
            k.reshape(rows, keys, heads, head_dim).transpose(1, 2),
            v.reshape(rows, keys, heads, head_dim).transpose(1, 2),
            attn_mask=mask,
            scale=self.scale,
        )
        return out.transpose(1, 2).reshape(batch, regions, tokens, dim)

    def _merge(self, out: torch.Tensor, lepe: torch.Tensor, grid: RegionGrid) -> torch.Tensor:
        """Attention output back to the image, plus LePE, through the output projection."""
        batch, dim = out.shape[0], out.shape[-1]
        if grid.needs_padding:
            y = lepe + _to_image(out, grid)
        else:
            image_order = _image_order(out, grid)
            y = lepe.reshape(image_order.shape) + image_order
        y = y.reshape((batch,) + grid.sizes + (dim,))
        return F.linear(y, self.proj.weight, self.proj.bias).movedim(-1, 1)


class GlobalAttention(nn.Module):
    """Plain multi-head attention over every position, plus a LePE (depthwise conv) of the
    attention's own input added before the output projection: HYATT-Net's last stage (the
    official ``AttentionLePE``, BiFormer's ``topk=-2``). No qkv bias; logits scaled by
    head_dim^-0.5. Channels-first (B, C, *spatial) in and out."""

    def __init__(self, dim: int, num_heads: int, spatial_dims: int, lepe_kernel: int = 5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.lepe = _CONVS[spatial_dims](dim, dim, lepe_kernel, padding="same", groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, spatial = x.shape[0], x.shape[2:]
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(tokens).view(batch, -1, 3, self.num_heads, self.dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(tokens.shape)
        out = self.proj(out + self.lepe(x).flatten(2).transpose(1, 2))
        return out.transpose(1, 2).reshape(x.shape[:2] + spatial)
