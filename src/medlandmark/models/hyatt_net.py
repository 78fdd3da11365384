"""HYATT-Net: 2D hybrid CNN + bi-level routing attention landmark network (see ANCHORS.md).

As the authors' code (ECNUACRush/HYATT-Net, ISBI 2015 config), block by block: 5 stages
(strides 2/4/8/16/32, widths 64, 128, 320, 512, 1024 x the width multiplier), each a 4x4 stride-2
patch-embedding conv (its BatchNorm is built but never applied there, so none here), one
BiFormer block (BRA with 1, 4, 8, 16 routed regions in
stages 1-4; plain global attention with 8 heads and LePE on its input in stage 5) and an
Attention Residual Module (ARM, with CBAM). Neck: FPN over stages 2-5 (3x3 laterals, nearest
top-down sums, a 3x3 conv) giving stride-4 features. Heads, each conv3x3-ReLU-conv1x1: stride-4
heatmaps, stride-2 heatmaps after a 4x4/2 deconv-BN-ReLU, and the Feature Fusion Correction
Module (FFCM) on the stride-2 features, the nearest-downsampled image (1x1 conv-BN-ReLU, 32
channels) and the stride-2 heatmaps, upsampled x2 (corners aligned) to full resolution.
77.24 M parameters at full width on RGB input with 19 landmarks, as the official network's
output-reaching modules (tested).

Deliberate differences: BRA masks the padding of sizes that do not divide into its regions
(routing_attention.py); at narrow widths each stage is at least one head wider than the one
before; the input has the plan's channels (1 for radiographs) rather than RGB.

Sizes: inputs whose sides are not multiples of 32 (``divisor``) are zero-padded at the
bottom/right and every output is cropped back, to ``ceil(side / stride)`` pixels. Pixel ``i`` of
a stride-``s`` output is centred on input coordinate ``s * i + (s - 1) / 2`` (pixel-area
convention, as ``F.interpolate(align_corners=False)``). Training with batch 1 needs more than
one stride-32 pixel (BatchNorm), i.e. a side over 32. The plan's region grids (``n_win``) are used
as given: on a map smaller than the grid, BRA's regions are single pixels and its empty padded
regions are never attended, which is exactly ``min(n_win, side)`` (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medlandmark.models.blocks import BiFormerBlock, Routing
from medlandmark.models.registry import register_model

BASE_WIDTHS = (64, 128, 320, 512, 1024)
FPN_BASE_CHANNELS = 256
FFCM_IMAGE_CHANNELS = 32
DIVISOR = 32


@dataclass(frozen=True)
class HyattSizes:
    """HYATT-Net's width multiplier, blocks per stage, region grid, routed regions (-1: all; -2: global attention, the last stage),
    key/value pooling, MLP ratios, attention head width and stochastic depth (the paper's)."""

    width_multiplier: float = 1.0
    depths: Sequence[int] = (1, 1, 1, 1, 1)
    n_win: Sequence = (16, 16, 16, 8, 8)
    topk: Sequence[int] = (1, 4, 8, 16, -2)
    kv_pool: int | None = 4
    mlp_ratios: Sequence[float] = (8, 8, 8, 4, 4)
    head_dim: int = 32
    drop_path: float = 0.1


DEFAULT_HYATT = {
    name: list(v) if isinstance(v, tuple) else v for name, v in asdict(HyattSizes()).items()
}


def round_width(channels: float, multiple: int) -> int:
    """``channels`` rounded to the nearest multiple of ``multiple`` (halves up), at least one."""
    return max(multiple, int(channels / multiple + 0.5) * multiple)


def stage_widths(width_multiplier: float, head_dim: int) -> list[int]:
    """Widths of the 5 stages: 64*[1,2,5,8,16]*multiplier rounded to multiples of ``head_dim``,
    each stage at least one head wider than the one before (at narrow widths the rounding would
    otherwise give stages 1 and 2 the same width; a deliberate difference from the paper, whose
    full width never needs it)."""
    widths = []
    for base in BASE_WIDTHS:
        width = round_width(base * width_multiplier, head_dim)
        widths.append(max(width, widths[-1] + head_dim) if widths else width)
    return widths


def hyatt_sizes(width_multiplier: float = 0.25, **overrides: object) -> dict:
    """HYATT-Net's builder arguments: the paper's, at ``width_multiplier`` (for tests and scripts)."""
    return {**DEFAULT_HYATT, "width_multiplier": width_multiplier, **overrides}


class CBAM(nn.Module):
    """Convolutional block attention: channel attention (shared MLP on avg- and max-pooled
    descriptors, sigmoid) then spatial attention (7x7 conv on channel mean/max, sigmoid)."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False)

    def channel_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, 1) channel attention in (0, 1)."""
        avg = self.mlp(x.mean((2, 3), keepdim=True))
        peak = self.mlp(x.amax((2, 3), keepdim=True))
        return torch.sigmoid(avg + peak)

    def spatial_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) spatial attention in (0, 1)."""
        maps = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(maps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_weights(x)
        return x * self.spatial_weights(x)


def conv_bn(in_channels: int, out_channels: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    """'Same' conv (no bias) -> BatchNorm."""
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    )


class AttentionResidualModule(nn.Module):
    """ARM: conv3x3-BN-ReLU -> conv3x3 (dilation 2)-BN -> CBAM, plus a 3x3 conv shortcut; ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(channels, channels, 3),
            nn.ReLU(inplace=True),
            conv_bn(channels, channels, 3, dilation=2),
            CBAM(channels),
        )
        self.shortcut = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class HyattStage(nn.Module):
    """4x4 stride-2 patch-embedding conv -> BiFormer block(s) -> ARM."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        num_heads: int,
        routing: Routing,
        drop_paths: Sequence[float],
    ):
        super().__init__()
        # the official patch embedding builds a BatchNorm but never applies it: a conv alone
        self.embed = nn.Conv2d(in_channels, width, 4, stride=2, padding=1)
        self.blocks = nn.Sequential(
            *(BiFormerBlock(width, num_heads, 2, routing, rate) for rate in drop_paths)
        )
        self.arm = AttentionResidualModule(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.arm(self.blocks(self.embed(x)))


class FeaturePyramidNeck(nn.Module):
    """FPN over stages 2-5: 3x3 laterals, top-down nearest upsampling + add, a 3x3 conv on the
    finest (stride-4) level; returns the stride-4 features only (the official neck also convolves
    the coarser levels, and discards them)."""

    def __init__(self, in_widths: Sequence[int], channels: int):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(w, channels, 3, padding=1) for w in in_widths)
        self.smooth = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        top = self.laterals[-1](features[-1])
        for lateral, feature in zip(
            reversed(self.laterals[:-1]), reversed(features[:-1]), strict=True
        ):
            top = lateral(feature) + F.interpolate(top, size=feature.shape[2:], mode="nearest")
        return self.smooth(top)


class FeatureFusionCorrection(nn.Module):
    """FFCM: the image, nearest-downsampled to half resolution, through 1x1 conv (32 ch)-BN-ReLU,
    concatenated after the stride-2 features and before the stride-2 heatmaps, all of those
    channels through conv3x3-ReLU and a 1x1 conv to heatmaps, then x2 bilinear upsampling
    (corners aligned), as the official head."""

    def __init__(self, in_channels: int, feature_channels: int, num_landmarks: int):
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(in_channels, FFCM_IMAGE_CHANNELS, 1),
            nn.BatchNorm2d(FFCM_IMAGE_CHANNELS),
            nn.ReLU(inplace=True),
        )
        fused = feature_channels + FFCM_IMAGE_CHANNELS + num_landmarks
        self.head = heatmap_head(fused, fused, num_landmarks)

    def forward(
        self, image: torch.Tensor, features: torch.Tensor, heatmaps: torch.Tensor
    ) -> torch.Tensor:
        half = self.image(F.interpolate(image, size=features.shape[2:], mode="nearest"))
        out = self.head(torch.cat([features, half, heatmaps], dim=1))
        return F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)


def heatmap_head(in_channels: int, hidden: int, num_landmarks: int) -> nn.Sequential:
    """The official heads: conv3x3 (bias) -> ReLU -> 1x1 conv to one heatmap per landmark."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, num_landmarks, 1),
    )


class HyattNet(nn.Module):
    """HYATT-Net: ``forward`` returns ``[full-res FFCM, stride-2, stride-4]`` heatmaps.

    Loss weights (``output_weights``) are the paper's 3000/3000/1000 in output order.
    ``heatmap_sigma_scale`` gives each output's Gaussian sigma, in that output's own pixels,
    relative to the full-resolution sigma in input pixels (the plan's ``heatmap_sigma_voxels``):
    the paper's 4 px at full resolution and 2 px at the stride-2 and stride-4 heads, i.e. in mm
    sigma, sigma and 2 * sigma. See ``output_sigma_voxels``.
    """

    output_strides = [(1, 1), (2, 2), (4, 4)]
    output_weights = [3000.0, 3000.0, 1000.0]
    heatmap_sigma_scale = [1.0, 0.5, 0.5]
    divisor = (DIVISOR, DIVISOR)

    def __init__(self, in_channels: int, num_landmarks: int, sizes: HyattSizes | None = None):
        super().__init__()
        sizes = sizes or HyattSizes()
        lists = {
            "depths": sizes.depths,
            "n_win": sizes.n_win,
            "topk": sizes.topk,
            "mlp_ratios": sizes.mlp_ratios,
        }
        for name, value in lists.items():
            if len(value) != len(BASE_WIDTHS):
                raise ValueError(
                    f"HYATT-Net {name} needs {len(BASE_WIDTHS)} entries, got {value!r}"
                )
        self.widths = stage_widths(sizes.width_multiplier, sizes.head_dim)
        rates = torch.linspace(0.0, sizes.drop_path, sum(sizes.depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        channels = in_channels
        settings = zip(
            self.widths, sizes.depths, sizes.n_win, sizes.topk, sizes.mlp_ratios, strict=True
        )
        for i, (width, depth, wins, k, ratio) in enumerate(settings):
            stage_rates = rates[sum(sizes.depths[:i]) : sum(sizes.depths[: i + 1])]
            wins = wins if isinstance(wins, int) else tuple(wins)
            routing = Routing(wins, k, sizes.kv_pool, ratio, lepe_kernel=5)
            self.stages.append(
                HyattStage(channels, width, width // sizes.head_dim, routing, stage_rates[:depth])
            )
            channels = width
        fpn_channels = round_width(FPN_BASE_CHANNELS * sizes.width_multiplier, 32)
        self.neck = FeaturePyramidNeck(self.widths[1:], fpn_channels)
        self.head4 = heatmap_head(fpn_channels, fpn_channels, num_landmarks)
        self.up2 = nn.Sequential(
            nn.ConvTranspose2d(fpn_channels, fpn_channels, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(fpn_channels),
            nn.ReLU(inplace=True),
        )
        self.head2 = heatmap_head(fpn_channels, fpn_channels, num_landmarks)
        self.ffcm = FeatureFusionCorrection(in_channels, fpn_channels, num_landmarks)

    def output_sigma_voxels(self, sigma_voxels: Sequence[float]) -> list[tuple[float, ...]]:
        """Per output, the target sigma in that output's own pixels for a full-resolution sigma
        ``sigma_voxels`` (input pixels, per axis); in input pixels: sigma, sigma, 2 * sigma."""
        return [tuple(float(s) * scale for s in sigma_voxels) for scale in self.heatmap_sigma_scale]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"HYATT-Net expects (B, C, H, W), got {tuple(x.shape)}")
        sizes = tuple(x.shape[2:])
        padded = self._pad(x)
        features = []
        h = padded
        for stage in self.stages:
            h = stage(h)
            features.append(h)
        stride4 = self.neck(features[1:])
        heatmaps4 = self.head4(stride4)
        stride2 = self.up2(stride4)
        heatmaps2 = self.head2(stride2)
        full = self.ffcm(padded, stride2, heatmaps2)
        outputs = [full, heatmaps2, heatmaps4]
        return [_crop(t, sizes, s) for t, s in zip(outputs, self.output_strides, strict=True)]

    @staticmethod
    def _pad(x: torch.Tensor) -> torch.Tensor:
        """``x`` zero-padded at the bottom/right to multiples of 32."""
        pad_h = -x.shape[2] % DIVISOR
        pad_w = -x.shape[3] % DIVISOR
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def _crop(t: torch.Tensor, sizes: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """A stride-``stride`` output cropped to ``ceil(size / stride)`` pixels per axis."""
    keep = tuple(math.ceil(n / s) for n, s in zip(sizes, stride, strict=True))
    if keep == tuple(t.shape[2:]):
        return t
    return t[:, :, : keep[0], : keep[1]]


@register_model("hyatt", spatial_dims=(2,))
def build_hyatt(num_landmarks: int, in_channels: int = 1, **sizes: object) -> HyattNet:
    """HYATT-Net sized by a plan configuration's ``architectures.hyatt`` (missing: paper values)."""
    unknown = sorted(set(sizes) - set(DEFAULT_HYATT))
    if unknown:
        raise ValueError(f"unknown HYATT-Net settings in the plan: {', '.join(unknown)}")
    return HyattNet(in_channels, num_landmarks, HyattSizes(**sizes))
