"""Random intensity transforms of a batch ``(B, C, *spatial)``, on the batch's device.

Each transform is applied to a sample with its own probability; its parameter is drawn per
sample and shared by the channels, its statistics (minimum, maximum, mean, standard deviation)
are taken per sample and channel. Nothing moves: landmarks are unaffected. Half-precision
batches are computed in float32 and returned in their own dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from medlandmark.augment.spatial import chance, normal, uniform

if TYPE_CHECKING:
    from medlandmark.augment import AugmentConfig

_EPS = 1e-8


def _spatial_dims(images: Tensor) -> tuple[int, ...]:
    return tuple(range(2, images.dim()))


def _per_sample(values: Tensor, images: Tensor) -> Tensor:
    """``(B,)`` values shaped to broadcast over ``(B, C, *spatial)``."""
    return values.to(images.dtype).reshape(-1, *([1] * (images.dim() - 1)))


def _mask(chosen: Tensor, images: Tensor) -> Tensor:
    return chosen.reshape(-1, *([1] * (images.dim() - 1)))


def _select(images: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    return chance(generator, images.shape[0], p, images.device)


def random_gamma(
    images: Tensor, gamma: tuple[float, float], p: float, generator: torch.Generator | None = None
) -> Tensor:
    """``x -> lo + (hi - lo) * ((x - lo) / (hi - lo)) ** g``: gamma keeping each channel's range."""
    chosen = _select(images, p, generator)
    g = uniform(generator, (images.shape[0],), *gamma, images.device)
    if not bool(chosen.any()):
        return images
    low = images.amin(_spatial_dims(images), keepdim=True)
    high = images.amax(_spatial_dims(images), keepdim=True)
    span = (high - low).clamp_min(_EPS)
    unit = ((images - low) / span).clamp(0, 1)
    adjusted = unit.pow(_per_sample(g, images)) * span + low
    return torch.where(_mask(chosen, images), adjusted, images)


def random_contrast(
    images: Tensor, factor: tuple[float, float], p: float, generator: torch.Generator | None = None
) -> Tensor:
    """``x -> mean + f * (x - mean)``, clipped to the channel's original range."""
    chosen = _select(images, p, generator)
    f = uniform(generator, (images.shape[0],), *factor, images.device)
    if not bool(chosen.any()):
        return images
    dims = _spatial_dims(images)
    mean = images.mean(dims, keepdim=True)
    adjusted = (images - mean) * _per_sample(f, images) + mean
    adjusted = torch.clamp(
        adjusted, images.amin(dims, keepdim=True), images.amax(dims, keepdim=True)
    )
    return torch.where(_mask(chosen, images), adjusted, images)


def random_brightness(
    images: Tensor, factor: tuple[float, float], p: float, generator: torch.Generator | None = None
) -> Tensor:
    """``x -> f * x``: multiplicative brightness."""
    chosen = _select(images, p, generator)
    f = uniform(generator, (images.shape[0],), *factor, images.device)
    return images * _per_sample(torch.where(chosen, f, torch.ones_like(f)), images)


def random_shift(
    images: Tensor, shift: tuple[float, float], p: float, generator: torch.Generator | None = None
) -> Tensor:
    """``x -> x + s * std``: additive brightness, in units of the channel's standard deviation."""
    chosen = _select(images, p, generator)
    s = uniform(generator, (images.shape[0],), *shift, images.device)
    if not bool(chosen.any()):
        return images
    std = images.std(_spatial_dims(images), keepdim=True)
    return images + _per_sample(torch.where(chosen, s, torch.zeros_like(s)), images) * std


def random_noise(
    images: Tensor, std: tuple[float, float], p: float, generator: torch.Generator | None = None
) -> Tensor:
    """Additive Gaussian noise, its standard deviation drawn per sample in ``std``."""
    chosen = _select(images, p, generator)
    sigma = uniform(generator, (images.shape[0],), *std, images.device)
    index = chosen.nonzero().flatten()
    if index.numel() == 0:
        return images
    noise = normal(generator, (index.numel(), *images.shape[1:]), images.device)
    out = images.clone()
    out[index] = images[index] + noise.to(images.dtype) * _per_sample(sigma[index], images)
    return out


def gaussian_blur(images: Tensor, sigma_voxels: Tensor) -> Tensor:
    """Gaussian blur, each sample with its own sigma ``(B,)`` in voxels; edges replicated."""
    batch, ndim = images.shape[0], images.dim() - 2
    radius = max(1, math.ceil(3 * float(sigma_voxels.max())))
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernels = torch.exp(-0.5 * (taps[None, :] / sigma_voxels[:, None].to(images.dtype)) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)
    out = images
    for dim in range(2, ndim + 2):  # separable; a weighted sum of shifted copies beats a
        padded = _replicate(out, dim, radius)  # grouped convolution with per-sample kernels
        length = out.shape[dim]
        out = torch.zeros_like(out)
        for tap in range(2 * radius + 1):
            weight = kernels[:, tap].reshape(batch, *([1] * (ndim + 1)))
            out += padded.narrow(dim, tap, length) * weight
    return out


def _replicate(x: Tensor, dim: int, radius: int) -> Tensor:
    """``x`` padded by ``radius`` along ``dim`` with copies of its edge values."""
    length = x.shape[dim]
    index = torch.arange(-radius, length + radius, device=x.device).clamp(0, length - 1)
    return x.index_select(dim, index)


def random_blur(
    images: Tensor,
    sigma_voxels: tuple[float, float],
    p: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Gaussian blur of the chosen samples, sigma drawn per sample in ``sigma_voxels``."""
    chosen = _select(images, p, generator)
    sigma = uniform(generator, (images.shape[0],), *sigma_voxels, images.device)
    index = chosen.nonzero().flatten()
    if index.numel() == 0:
        return images
    out = images.clone()
    out[index] = gaussian_blur(images[index], sigma[index])
    return out


def augment_intensity(
    images: Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Noise, blur, brightness (x and +), contrast and gamma, each with its probability."""
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    work = random_noise(work, config.noise_std, config.p_noise, generator)
    work = random_blur(work, config.blur_sigma_voxels, config.p_blur, generator)
    work = random_brightness(work, config.brightness, config.p_brightness, generator)
    work = random_shift(work, config.brightness_shift, config.p_brightness_shift, generator)
    work = random_contrast(work, config.contrast, config.p_contrast, generator)
    work = random_gamma(work, config.gamma, config.p_gamma, generator)
    return work.to(images.dtype) if images.is_floating_point() else work
