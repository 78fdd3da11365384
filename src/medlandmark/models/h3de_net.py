"""H3DE-Net: 3D hybrid CNN + bi-level routing attention encoder, U-Net decoder, heatmap per landmark.

Encoder: stem of two stride-2 3x3x3 convs (InstanceNorm, GELU between them), then four stages of
BiFormer blocks with 3D BRA at strides 4, 8, 16, 32 (a stride-2 3x3x3 conv + LayerNorm before
stages 2-4), each closed by a LayerNorm that feeds the skip and the next stage, as the authors'
code (ECNUACRush/H3DE-Net, PBiFormer_Unet). Decoder: at each level trilinear x2, concat skip, 2x (conv3x3x3-IN-LeakyReLU); the
stride-2 level also receives the stem's first features and a conv branch on the x0.5-pooled
input, the stride-1 level a conv branch on the input (multi-scale fusion); 1x1x1 conv to one
heatmap per landmark.

Any input size works without padding to a multiple of 32: strided convs give ceil(size / 2) and
each upsampled map is cropped to its skip. Deep-supervision output ``i`` has ceil(size / stride)
voxels per axis. Choices beyond ANCHORS.md: heads = width // 8 (head dim 8, as ANCHORS' width/8
at full width, kept when a width multiplier shrinks the widths); LayerNorm after the stage
downsampling convs (InstanceNorm fails on the 1-voxel maps that small inputs give at stride 32);
the region grid of every stage is clipped to its feature map per axis at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from medlandmark.models.blocks import BiFormerBlock, ChannelLayerNorm, ConvNormAct, Routing
from medlandmark.models.registry import register_model

SPATIAL_DIMS = 3
HEAD_DIM = 8
CPU_WIDTH_MULTIPLIER = 0.25
FULL_WIDTHS = (64, 128, 256, 512)
FULL_DEPTHS = (2, 2, 4, 2)
FULL_TOPK = (1, 4, 16, 16)
REFERENCE_N_WIN = (4, 4, 2)
# Deep-supervision outputs at strides 1, 2, 4, 8 (nnU-Net's 1/2^i weights; the stride-16
# decoder level would get weight 0, so it has no output).
DEEP_SUPERVISION_LEVELS = 4
# Below this size on every axis the stride-16 maps are one voxel, where InstanceNorm is undefined.
MIN_SIZE_WITHOUT_PADDING = 17


def scaled_width(width: int, multiplier: float) -> int:
    """``width * multiplier`` rounded to a multiple of 8, at least 8."""
    return max(8, int(round(width * multiplier / 8)) * 8)


def _half_resolution(x: torch.Tensor) -> torch.Tensor:
    """x0.5 average pooling to ceil(size / 2) voxels per axis (partial windows averaged)."""
    kernel = [2 if s > 1 else 1 for s in x.shape[2:]]
    return F.avg_pool3d(x, kernel, stride=kernel, ceil_mode=True)


def _upsampled_to(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Trilinear x2 upsampling cropped to ``sizes`` (the skip's, at most twice x's)."""
    up = F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=False)
    return up[(..., *(slice(0, s) for s in sizes))]


class Stem(nn.Module):
    """Two stride-2 3x3x3 convs with InstanceNorm, GELU between them (as the official stem, none
    after the second); returns the stride-2 and -4 maps."""

    def __init__(self, in_channels: int, widths: tuple[int, int]):
        super().__init__()
        self.conv1 = nn.Sequential(*self._unit(in_channels, widths[0]), nn.GELU())
        self.conv2 = nn.Sequential(*self._unit(widths[0], widths[1]))

    @staticmethod
    def _unit(in_channels: int, out_channels: int) -> tuple[nn.Module, nn.Module]:
        return (
            nn.Conv3d(in_channels, out_channels, 3, stride=2, padding=1),
            nn.InstanceNorm3d(out_channels, eps=1e-5),  # non-affine, as the official stem
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.conv1(x)
        return half, self.conv2(half)


class Stage(nn.Module):
    """Optional stride-2 conv + LayerNorm, then BiFormer blocks with 3D bi-level routing attention
    and a closing LayerNorm whose output is both the skip and the next stage's input (official).

    The planned region grid is used as is: on a map smaller than the grid the attention leaves
    the extra regions empty and never routes to them, which equals clipping the grid (tested).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        routing: Routing,
        drop_paths: Sequence[float],
        downsample: bool,
    ):
        super().__init__()
        self.downsample = (
            nn.Sequential(
                nn.Conv3d(in_channels, channels, 3, stride=2, padding=1), ChannelLayerNorm(channels)
            )
            if downsample
            else nn.Identity()
        )
        self.planned_n_win = tuple(int(n) for n in routing.n_win)
        heads = max(1, channels // HEAD_DIM)
        routing = replace(routing, n_win=self.planned_n_win)
        self.blocks = nn.ModuleList(
            BiFormerBlock(channels, heads, SPATIAL_DIMS, routing, rate) for rate in drop_paths
        )
        self.norm = ChannelLayerNorm(channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class UpBlock(nn.Module):
    """Trilinear x2, concatenate the skips, two conv3x3x3-IN-LeakyReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.convs = nn.Sequential(
            ConvNormAct(in_channels + skip_channels, out_channels, 3, SPATIAL_DIMS),
            ConvNormAct(out_channels, out_channels, 3, SPATIAL_DIMS),
        )

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = _upsampled_to(x, skips[0].shape[2:])
        return self.convs(torch.cat([x, *skips], dim=1))


@dataclass(frozen=True)
class H3DESizes:
    """H3DE-Net's stage widths and depths, region grid(s), routed regions per stage, MLP ratio,
    stochastic depth, LePE kernel and whether deep-supervision heads are used."""

    widths: Sequence[int] = FULL_WIDTHS
    depths: Sequence[int] = FULL_DEPTHS
    n_win: Sequence = REFERENCE_N_WIN
    topk: Sequence[int] = FULL_TOPK
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    lepe_kernel: int = 5
    deep_supervision: bool = True


class H3DENet(nn.Module):
    """H3DE-Net on (B, C, D, H, W): a list of heatmaps, [0] at full resolution (B, K, D, H, W).

    ``widths`` are the four stage widths (already scaled); ``n_win`` is one region grid per axis
    for every stage, or one grid per stage. With ``deep_supervision`` the list also holds the
    outputs at strides 2, 4, 8 (``output_strides``, loss weights ``output_weights``); the heads
    exist either way so that checkpoints load in both modes.
    """

    def __init__(self, in_channels: int, num_landmarks: int, sizes: H3DESizes | None = None):
        super().__init__()
        sizes = sizes or H3DESizes()
        widths = tuple(int(w) for w in sizes.widths)
        if len(widths) != 4 or len(sizes.depths) != 4 or len(sizes.topk) != 4:
            raise ValueError("H3DE-Net needs 4 widths, 4 depths and 4 top-k values")
        grids = _stage_grids(sizes.n_win)
        fine = (max(8, widths[0] // 2), max(8, widths[0] // 4))  # decoder widths at strides 2, 1
        self.deep_supervision = sizes.deep_supervision
        self.stem = Stem(in_channels, (fine[0], widths[0]))
        rates = torch.linspace(0.0, sizes.drop_path, sum(sizes.depths), device="cpu").tolist()
        starts = [sum(sizes.depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList()
        for i in range(4):
            stage_rates = rates[starts[i] : starts[i] + sizes.depths[i]]
            routing = Routing(
                grids[i],
                int(sizes.topk[i]),
                mlp_ratio=sizes.mlp_ratio,
                lepe_kernel=sizes.lepe_kernel,
            )
            stage = Stage(widths[max(i - 1, 0)], widths[i], routing, stage_rates, downsample=i > 0)
            self.stages.append(stage)
        self.input_full = ConvNormAct(in_channels, fine[1], 3, SPATIAL_DIMS)
        self.input_half = ConvNormAct(in_channels, fine[1], 3, SPATIAL_DIMS)
        self.up = nn.ModuleList(
            [
                UpBlock(widths[3], widths[2], widths[2]),  # stride 16
                UpBlock(widths[2], widths[1], widths[1]),  # stride 8
                UpBlock(widths[1], widths[0], widths[0]),  # stride 4
                UpBlock(widths[0], fine[0] + fine[1], fine[0]),  # stride 2: stem + x0.5 input
                UpBlock(fine[0], fine[1], fine[1]),  # stride 1: input
            ]
        )
        head_channels = (fine[1], fine[0], widths[0], widths[1])  # strides 1, 2, 4, 8
        self.heads = nn.ModuleList(nn.Conv3d(c, num_landmarks, 1) for c in head_channels)
        self.apply(_init_weights)

    @property
    def output_strides(self) -> list[tuple[int, int, int]]:
        levels = DEEP_SUPERVISION_LEVELS if self.deep_supervision else 1
        return [(2**i,) * SPATIAL_DIMS for i in range(levels)]

    @property
    def output_weights(self) -> list[float]:
        weights = [0.5**i for i in range(len(self.output_strides))]
        return [w / sum(weights) for w in weights]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 5:
            raise ValueError(f"H3DE-Net expects (B, C, D, H, W), got {tuple(x.shape)}")
        sizes = tuple(x.shape[2:])
        x = _padded_if_tiny(x)
        half, y = self.stem(x)
        features = []  # stage outputs at strides 4, 8, 16, 32
        for stage in self.stages:
            y = stage(y)
            features.append(y)
        y = self.up[0](features[3], [features[2]])
        stride8 = self.up[1](y, [features[1]])
        stride4 = self.up[2](stride8, [features[0]])
        stride2 = self.up[3](stride4, [half, self.input_half(_half_resolution(x))])
        stride1 = self.up[4](stride2, [self.input_full(x)])
        levels = (stride1, stride2, stride4, stride8)[: len(self.output_strides)]
        return [
            _cropped(head(level), sizes, 2**i)
            for i, (head, level) in enumerate(zip(self.heads, levels, strict=False))
        ]


def _stage_grids(n_win: Sequence) -> list[tuple[int, ...]]:
    """Four per-axis region grids from one grid (every stage) or one grid per stage."""
    if len(n_win) and isinstance(n_win[0], Sequence):
        if len(n_win) != 4:
            raise ValueError(f"n_win needs one grid per stage (4), got {list(n_win)}")
        grids = [tuple(int(n) for n in g) for g in n_win]
    else:
        grids = [tuple(int(n) for n in n_win)] * 4
    if any(len(g) != SPATIAL_DIMS or min(g) < 1 for g in grids):
        raise ValueError(f"n_win must give {SPATIAL_DIMS} positive region counts, got {n_win}")
    return grids


def _padded_if_tiny(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad (at the end) an input whose every axis is too small for the stride-16 level."""
    if max(x.shape[2:]) >= MIN_SIZE_WITHOUT_PADDING:
        return x
    pads = []
    for size in reversed(x.shape[2:]):
        pads += [0, MIN_SIZE_WITHOUT_PADDING - size]
    return F.pad(x, pads)


def _cropped(y: torch.Tensor, sizes: Sequence[int], stride: int) -> torch.Tensor:
    """The first ceil(size / stride) voxels per axis."""
    return y[(..., *(slice(0, math.ceil(s / stride)) for s in sizes))]


def _init_weights(module: nn.Module) -> None:
    """Spatial convs: Kaiming (LeakyReLU 0.01, nnU-Net); linears and 1x1x1 convs (MLPs, heads):
    truncated normal 0.02 (BiFormer)."""
    pointwise = isinstance(module, nn.Conv3d) and all(k == 1 for k in module.kernel_size)
    if isinstance(module, nn.Linear) or pointwise:
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
    else:
        return
    if module.bias is not None:
        nn.init.zeros_(module.bias)


@register_model("h3de", spatial_dims=(3,))
def build_h3de(num_landmarks: int, in_channels: int = 1, **sizes: object) -> H3DENet:
    """H3DE-Net sized by a plan configuration's ``architectures.h3de`` (widths x width_multiplier)."""
    multiplier = float(sizes.get("width_multiplier", 1.0))
    network_sizes = H3DESizes(
        widths=[scaled_width(w, multiplier) for w in sizes.get("widths", FULL_WIDTHS)],
        depths=sizes.get("depths", FULL_DEPTHS),
        n_win=sizes.get("n_win", REFERENCE_N_WIN),
        topk=sizes.get("topk", FULL_TOPK),
        mlp_ratio=float(sizes.get("mlp_ratio", 4)),
        drop_path=float(sizes.get("drop_path", 0.0)),
        deep_supervision=bool(sizes.get("deep_supervision", True)),
    )
    return H3DENet(in_channels, num_landmarks, network_sizes)


def h3de_sizes(
    width_multiplier: float = CPU_WIDTH_MULTIPLIER,
    n_win: Sequence = REFERENCE_N_WIN,
    **overrides: object,
) -> dict:
    """H3DE-Net's builder arguments (CPU-sized by default), for tests and demos."""
    sizes = {
        "width_multiplier": width_multiplier,
        "widths": list(FULL_WIDTHS),
        "depths": list(FULL_DEPTHS),
        "n_win": list(n_win),
        "topk": list(FULL_TOPK),
        "mlp_ratio": 4,
    }
    return {**sizes, **overrides}
