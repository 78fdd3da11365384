"""Small building blocks shared by the networks, 2D and 3D, on channels-first tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medlandmark.models.routing_attention import BiLevelRoutingAttention, GlobalAttention

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
GLOBAL_ATTENTION = -2  # Routing.topk of a plain global attention block
GLOBAL_HEADS = 8  # its heads, as the official AttentionLePE's


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, *spatial)``, at every position."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability ``rate``."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Mlp(nn.Module):
    """Position-wise MLP (1x1 convolutions): expand by ``ratio``, GELU, project back."""

    def __init__(self, channels: int, ratio: float, spatial_dims: int):
        super().__init__()
        hidden = int(channels * ratio)
        conv = CONV[spatial_dims]
        self.expand = conv(channels, hidden, 1)
        self.project = conv(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.gelu(self.expand(x)))


@dataclass(frozen=True)
class Routing:
    """How a BiFormer block attends: the region grid ``n_win``, the ``topk`` regions each region
    routes to (-1: all; -2: plain global attention with ``GLOBAL_HEADS`` heads and LePE on its
    input, HYATT-Net's last stage), key/value pooling, the MLP's width ratio and the LePE kernel."""

    n_win: int | tuple[int, ...]
    topk: int
    kv_pool: int | tuple[int, ...] | None = None
    mlp_ratio: float = 4.0
    lepe_kernel: int = 5


class BiFormerBlock(nn.Module):
    """BiFormer block: depthwise positional conv (residual) -> LayerNorm -> bi-level routing
    attention -> residual -> LayerNorm -> MLP -> residual, with stochastic depth."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        spatial_dims: int,
        routing: Routing,
        drop_path: float = 0.0,
    ):
        super().__init__()
        n_win, topk, kv_pool, mlp_ratio, lepe_kernel = (
            routing.n_win,
            routing.topk,
            routing.kv_pool,
            routing.mlp_ratio,
            routing.lepe_kernel,
        )
        conv = CONV[spatial_dims]
        self.position = conv(channels, channels, 3, padding=1, groups=channels)
        self.norm1 = ChannelLayerNorm(channels)
        if topk == GLOBAL_ATTENTION:
            self.attention = GlobalAttention(channels, GLOBAL_HEADS, spatial_dims, lepe_kernel)
        else:
            self.attention = BiLevelRoutingAttention(
                channels, num_heads, n_win, topk, spatial_dims, kv_pool, lepe_kernel=lepe_kernel
            )
        self.norm2 = ChannelLayerNorm(channels)
        self.mlp = Mlp(channels, mlp_ratio, spatial_dims)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.position(x)
        x = x + self.drop_path(self.attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvNormAct(nn.Sequential):
    """Convolution -> instance norm -> LeakyReLU (nnU-Net's basic unit)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | list[int],
        spatial_dims: int,
        stride: int | list[int] = 1,
    ):
        kernel = [kernel] * spatial_dims if isinstance(kernel, int) else list(kernel)
        padding = [k // 2 for k in kernel]
        super().__init__(
            CONV[spatial_dims](in_channels, out_channels, kernel, stride=stride, padding=padding),
            INSTANCE_NORM[spatial_dims](out_channels, affine=True, eps=1e-5),
            nn.LeakyReLU(0.01, inplace=True),
        )
