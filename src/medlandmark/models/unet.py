"""U-Net baseline built from the plan's topology (nnU-Net's plain convolutional U-Net).

Each encoder stage is ``n_conv`` conv-norm-LeakyReLU units (the first strided by the plan);
each decoder stage upsamples by a transposed convolution, concatenates the skip and applies
``n_conv`` units. Decoder stages have 1x1 heatmap heads for deep supervision with nnU-Net's
weights 1/2^i, except the lowest, which nnU-Net leaves unsupervised and so has no head.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medlandmark.models.blocks import CONV, TRANSPOSED_CONV, ConvNormAct
from medlandmark.models.registry import register_model


class EncoderStage(nn.Sequential):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: list[int],
        stride: list[int],
        n_conv: int,
        spatial_dims: int,
    ):
        units = [ConvNormAct(in_channels, out_channels, kernel, spatial_dims, stride=stride)]
        units += [
            ConvNormAct(out_channels, out_channels, kernel, spatial_dims) for _ in range(n_conv - 1)
        ]
        super().__init__(*units)


class DecoderStage(nn.Module):
    """Upsample the deeper features, concatenate the skip, convolve; also emit heatmaps."""

    def __init__(
        self,
        deep: int,
        skip: int,
        kernel: list[int],
        stride: list[int],
        n_conv: int,
        spatial_dims: int,
        num_landmarks: int,
    ):
        super().__init__()
        self.upsample = TRANSPOSED_CONV[spatial_dims](deep, skip, stride, stride=stride, bias=False)
        units = [ConvNormAct(2 * skip, skip, kernel, spatial_dims)]
        units += [ConvNormAct(skip, skip, kernel, spatial_dims) for _ in range(n_conv - 1)]
        self.convs = nn.Sequential(*units)
        self.head = None if num_landmarks is None else CONV[spatial_dims](skip, num_landmarks, 1)

    def forward(
        self, deep: torch.Tensor, skip: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.convs(torch.cat([self.upsample(deep), skip], dim=1))
        return features, None if self.head is None else self.head(features)


class UNet(nn.Module):
    """Plain U-Net: ``forward`` returns heatmaps from full resolution down (deep supervision)."""

    def __init__(
        self,
        in_channels: int,
        num_landmarks: int,
        features_per_stage: list[int],
        strides: list[list[int]],
        kernel_sizes: list[list[int]],
        n_conv_per_stage: int = 2,
        deep_supervision: bool = True,
    ):
        super().__init__()
        spatial_dims = len(strides[0])
        self.encoder = nn.ModuleList()
        channels = in_channels
        for features, stride, kernel in zip(features_per_stage, strides, kernel_sizes, strict=True):
            self.encoder.append(
                EncoderStage(channels, features, kernel, stride, n_conv_per_stage, spatial_dims)
            )
            channels = features
        levels = len(features_per_stage) - 1
        supervised = max(1, levels - 1) if deep_supervision else 1
        self.decoder = nn.ModuleList(
            DecoderStage(
                features_per_stage[s + 1],
                features_per_stage[s],
                kernel_sizes[s],
                strides[s + 1],
                n_conv_per_stage,
                spatial_dims,
                num_landmarks if s < supervised else None,
            )
            for s in reversed(range(levels))
        )
        cumulative = np.cumprod(np.asarray(strides), axis=0)
        self.output_strides = [tuple(int(v) for v in cumulative[s]) for s in range(supervised)]
        weights = np.array([1 / 2**i for i in range(supervised)])
        self.output_weights = (weights / weights.sum()).tolist()
        self.divisor = tuple(int(v) for v in cumulative[-1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        outputs = []
        for decoder, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            x, heatmaps = decoder(x, skip)
            if heatmaps is not None:
                outputs.append(heatmaps)
        outputs.reverse()  # full resolution first
        return outputs


@register_model("unet", spatial_dims=(2, 3))
def build_unet(num_landmarks: int, in_channels: int = 1, **sizes: object) -> UNet:
    """The U-Net sized by a plan configuration's ``architectures.unet``."""
    return UNet(in_channels, num_landmarks, **sizes)
