"""The straightforward gather-based bi-level routing attention, as the public BiFormer code does it.

A reference for benchmarks/bra.py only: same parameters and state_dict layout as
``medlandmark.models.routing_attention.BiLevelRoutingAttention`` (``qkv``, ``lepe``, ``proj``),
same computation on maps whose sizes divide by the region grid (no padding support). It follows
BiFormer's sequence of rearranges: channels-last regions, one qkv linear split into q and kv,
per-region adaptive average pooling of kv, routing from region means, ``torch.gather`` of the
routed regions into (B, R, topk, tokens, 2C), then explicit matmul -> softmax -> matmul, which
materialises the attention matrix, LePE on an NCHW copy of V, output projection.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_CONVS = {2: nn.Conv2d, 3: nn.Conv3d}
_POOLS = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def _per_axis(value, spatial_dims):
    return (value,) * spatial_dims if isinstance(value, int) else tuple(value)


class GatherBiLevelRoutingAttention(nn.Module):
    """Gather-based BRA on channels-first maps (B, C, *spatial); sizes must divide by n_win."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win,
        topk: int,
        spatial_dims: int,
        kv_pool=None,
        qkv_bias: bool = True,
        lepe_kernel: int = 5,
    ) -> None:
        super().__init__()
        self.dim, self.num_heads, self.topk, self.nd = dim, num_heads, topk, spatial_dims
        self.scale = (dim // num_heads) ** -0.5
        self.n_win = _per_axis(n_win, spatial_dims)
        pool = None if kv_pool is None else _per_axis(kv_pool, spatial_dims)
        self.kv_down = nn.Identity() if pool is None else _POOLS[spatial_dims](pool)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = _CONVS[spatial_dims](
            dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim
        )
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd, n, dim, heads = self.nd, self.n_win, self.dim, self.num_heads
        batch, sizes = x.shape[0], tuple(x.shape[2:])
        if any(s % w for s, w in zip(sizes, n, strict=True)):
            raise ValueError(f"baseline needs sizes {sizes} divisible by n_win {n}")
        r = tuple(s // w for s, w in zip(sizes, n, strict=True))
        regions, tokens = math.prod(n), math.prod(r)
        x = x.permute(0, *range(2, nd + 2), 1)  # the BiFormer block works channels-last
        # "n (j h) (i w) c -> n (j i) h w c"
        split = x.reshape(batch, *[v for pair in zip(n, r, strict=True) for v in pair], dim)
        grid_dims = [1 + 2 * a for a in range(nd)]
        region_dims = [2 + 2 * a for a in range(nd)]
        x = split.permute(0, *grid_dims, *region_dims, 2 * nd + 1).reshape(batch, regions, *r, dim)
        q, kv = self.qkv(x).split([dim, 2 * dim], dim=-1)
        q_pix = q.reshape(batch, regions, tokens, dim)
        # "n p2 h w c -> (n p2) c h w", pool, "(n p2) c h w -> n p2 (h w) c"
        kv_pix = self.kv_down(kv.reshape(batch * regions, *r, 2 * dim).movedim(-1, 1))
        kv_pix = kv_pix.flatten(2).transpose(1, 2).reshape(batch, regions, -1, 2 * dim)
        spatial = tuple(range(2, 2 + nd))
        q_win, k_win = q.mean(spatial), kv[..., :dim].mean(spatial)
        # "n (j i) h w c -> n c (j h) (i w)"
        v_img = kv[..., dim:].reshape(batch, *n, *r, dim)
        order = [v for a in range(nd) for v in (1 + a, 1 + nd + a)]
        v_img = v_img.permute(0, 2 * nd + 1, *order).reshape(batch, dim, *sizes).contiguous()
        lepe = self.lepe(v_img).permute(0, *range(2, nd + 2), 1)
        # routing (detached, hard top-k; BiFormer's TopkRouting)
        logits = (q_win.detach() * self.scale) @ k_win.detach().transpose(-2, -1)
        r_idx = torch.topk(logits, k=min(self.topk, regions), dim=-1).indices
        # KVGather: gather routed regions' pooled keys/values
        kv_tokens, topk = kv_pix.shape[2], r_idx.shape[-1]
        kv_sel = torch.gather(
            kv_pix.view(batch, 1, regions, kv_tokens, 2 * dim).expand(-1, regions, -1, -1, -1),
            dim=2,
            index=r_idx.view(batch, regions, topk, 1, 1).expand(-1, -1, -1, kv_tokens, 2 * dim),
        )
        k_sel, v_sel = kv_sel.split([dim, dim], dim=-1)
        # "n p2 k w2 (m c) -> (n p2) m c (k w2)" and "... -> (n p2) m (k w2) c"
        k_sel = k_sel.reshape(batch * regions, topk * kv_tokens, heads, -1).permute(0, 2, 3, 1)
        v_sel = v_sel.reshape(batch * regions, topk * kv_tokens, heads, -1).transpose(1, 2)
        q_pix = q_pix.reshape(batch * regions, tokens, heads, -1).transpose(1, 2)
        attn = ((q_pix * self.scale) @ k_sel).softmax(dim=-1)
        out = attn @ v_sel  # (n p2) m w2 c
        # "(n j i) m (h w) c -> n (j h) (i w) (m c)"
        out = out.reshape(batch, *n, heads, *r, -1)
        head_dim_order = [v for a in range(nd) for v in (1 + a, 2 + nd + a)]
        out = out.permute(0, *head_dim_order, 1 + nd, 2 + 2 * nd).reshape(batch, *sizes, dim)
        out = self.proj(out + lepe)
        return out.permute(0, nd + 1, *range(1, nd + 1))
