"""Heatmap targets and decoding: sub-voxel accuracy, presence, confidence, strides, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medlandmark.heatmaps import (
    AUTO_METHOD,
    DEFAULT_PRESENCE_THRESHOLD,
    calibrate_presence_threshold,
    decode_heatmaps,
    deep_supervision_targets,
    gaussian_heatmaps,
    points_at_stride,
    points_from_stride,
)

REFINED = ("auto", "gaussian_fit", "quadratic", "centroid")


def dense_gaussians(points: torch.Tensor, shape, sigma: torch.Tensor) -> torch.Tensor:
    """Reference (B, K, *shape) Gaussians from per-voxel distances (independent of the module)."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    grid = torch.stack(grids, dim=-1)  # (*shape, D)
    view = points.shape[:2] + (1,) * len(shape) + points.shape[-1:]
    scaled = (grid - points.double().reshape(view)) / sigma.double().reshape(view)
    return torch.exp(-0.5 * scaled.square().sum(dim=-1)).float()


def random_points(generator, batch, count, ndim, side, margin):
    return margin + torch.rand(batch, count, ndim, generator=generator, dtype=torch.float64) * (
        side - 1 - 2 * margin
    )


@pytest.mark.parametrize(("ndim", "side", "count"), [(2, 40, 400), (3, 24, 120)])
def test_default_method_recovers_random_subvoxel_gaussians_within_005_voxel(ndim, side, count):
    generator = torch.Generator().manual_seed(ndim)
    points = random_points(generator, 1, count, ndim, side, margin=8)
    sigma = 2.0 + 2.0 * torch.rand(1, count, ndim, generator=generator, dtype=torch.float64)
    heatmaps = dense_gaussians(points, (side,) * ndim, sigma)
    decoded = decode_heatmaps(heatmaps)
    error = (decoded.points.double() - points).norm(dim=-1)
    assert decoded.method == AUTO_METHOD
    assert error.max().item() < 0.05
    assert decoded.present.all()


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("method", [*REFINED, "argmax"])
def test_decoding_targets_returns_their_points(ndim, method):
    generator = torch.Generator().manual_seed(10 + ndim)
    side = 32 if ndim == 2 else 20
    points = random_points(generator, 2, 16, ndim, side, margin=6).float()
    heatmaps, present = gaussian_heatmaps(points, (side,) * ndim, 2.5)
    decoded = decode_heatmaps(heatmaps, method)
    assert present.all()
    assert decoded.points.shape == points.shape and decoded.points.dtype == torch.float32
    if method == "argmax":
        assert (decoded.points - points).abs().max() <= 0.5 + 1e-6
        assert torch.equal(decoded.points, decoded.argmax.float())
    else:
        assert (decoded.points - points).norm(dim=-1).max() < 0.05


@pytest.mark.parametrize("method", ["gaussian_fit", "quadratic"])
def test_rotated_anisotropic_gaussian_is_recovered_exactly(method):
    """Full-Hessian refinement: a tilted elongated Gaussian is not fooled by per-axis fits."""
    generator = torch.Generator().manual_seed(3)
    points = random_points(generator, 1, 50, 2, 40, margin=10)
    angle = math.radians(35)
    rotation = torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    )
    covariance = rotation @ torch.diag(torch.tensor([1.5, 4.0]) ** 2) @ rotation.T
    grid = torch.stack(torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij"), -1)
    d = grid[None, None] - points.float()[:, :, None, None]  # (1, K, 40, 40, 2)
    mahalanobis = (d @ torch.linalg.inv(covariance) * d).sum(-1)
    decoded = decode_heatmaps(torch.exp(-0.5 * mahalanobis), method)
    assert (decoded.points - points.float()).norm(dim=-1).max() < 0.01


def test_blank_and_low_noise_channels_are_reported_missing():
    generator = torch.Generator().manual_seed(4)
    points = torch.tensor([[[20.3, 11.6], [float("nan"), float("nan")], [9.0, 30.2]]])
    heatmaps, _ = gaussian_heatmaps(points, (40, 40), 3.0)
    heatmaps[0, 2] = 0.02 * torch.randn(40, 40, generator=generator)  # blank but noisy
    decoded = decode_heatmaps(heatmaps)
    assert decoded.present.tolist() == [[True, False, False]]
    assert decoded.peak[0, 1] == 0 and decoded.peak[0, 2] < DEFAULT_PRESENCE_THRESHOLD
    masked = decoded.masked_points()
    assert torch.isnan(masked[0, 1:]).all() and torch.allclose(
        masked[0, 0], points[0, 0], atol=0.01
    )
    assert decoded.spread[0, 1] == math.inf


def test_presence_threshold_is_an_argument():
    heatmaps, _ = gaussian_heatmaps(torch.tensor([[[10.0, 10.0]]]), (20, 20), 2.0)
    heatmaps = 0.4 * heatmaps
    assert decode_heatmaps(heatmaps, presence_threshold=0.3).present.item()
    assert not decode_heatmaps(heatmaps, presence_threshold=0.5).present.item()


def test_target_peaks_at_one_on_an_integer_centre_with_exp_half_at_one_sigma():
    heatmaps, present = gaussian_heatmaps(torch.tensor([[[10.0, 12.0]]]), (24, 30), (2.0, 4.0))
    h = heatmaps[0, 0]
    assert h.shape == (24, 30) and present.tolist() == [[True]]
    assert h[10, 12] == 1.0 and h.max() == 1.0
    assert h[12, 12].item() == pytest.approx(math.exp(-0.5), rel=1e-6)  # one sigma along axis 0
    assert h[8, 12].item() == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert h[10, 16].item() == pytest.approx(math.exp(-0.5), rel=1e-6)  # one sigma along axis 1
    assert h[10, 14].item() == pytest.approx(math.exp(-0.125), rel=1e-6)  # half a sigma on axis 1
    assert h[12, 16].item() == pytest.approx(math.exp(-1.0), rel=1e-6)


def test_targets_match_dense_gaussians_in_3d_with_anisotropic_sigma():
    generator = torch.Generator().manual_seed(5)
    points = random_points(generator, 2, 3, 3, 16, margin=2)
    sigma = torch.tensor([1.5, 2.5, 3.5])
    heatmaps, _ = gaussian_heatmaps(points.float(), (16, 18, 20), sigma, truncate=None)
    reference = dense_gaussians(points, (16, 18, 20), sigma.expand(2, 3, 3))
    torch.testing.assert_close(heatmaps, reference, atol=1e-6, rtol=1e-5)


def test_targets_are_truncated_at_four_sigma():
    heatmaps, _ = gaussian_heatmaps(torch.tensor([[[0.0, 0.0]]]), (20, 20), 2.0)
    assert heatmaps[0, 0, 8, 0] > 0 and heatmaps[0, 0, 9, 0] == 0
    untruncated, _ = gaussian_heatmaps(torch.tensor([[[0.0, 0.0]]]), (20, 20), 2.0, truncate=None)
    assert untruncated[0, 0, 9, 0] > 0


def test_missing_landmarks_give_zero_targets_and_present_false():
    points = torch.tensor([[[5.0, 5.0, 5.0], [float("nan")] * 3, [4.0, float("nan"), 2.0]]])
    heatmaps, present = gaussian_heatmaps(points, (10, 10, 10), 2.0)
    assert present.tolist() == [[True, False, False]]
    assert heatmaps[0, 0].max() == 1 and not heatmaps[0, 1:].any()
    assert torch.isfinite(heatmaps).all()


def test_targets_follow_the_points_device_and_requested_dtype():
    points = torch.tensor([[[5.5, 6.5]]])
    heatmaps, present = gaussian_heatmaps(points, (12, 12), 2.0, dtype=torch.bfloat16)
    assert heatmaps.dtype == torch.bfloat16 and heatmaps.device == points.device
    assert present.device == points.device


def test_sigma_may_differ_per_landmark():
    points = torch.tensor([[[10.0, 10.0], [10.0, 10.0]]])
    heatmaps, _ = gaussian_heatmaps(points, (21, 21), torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    assert heatmaps[0, 0, 11, 10].item() == pytest.approx(math.exp(-0.5))
    assert heatmaps[0, 1, 13, 10].item() == pytest.approx(math.exp(-0.5))


@pytest.mark.parametrize(
    "call",
    [
        lambda: gaussian_heatmaps(torch.zeros(1, 1, 2), (8, 8), 0.0),
        lambda: gaussian_heatmaps(torch.zeros(1, 1, 2), (8, 8), (1.0, 2.0, 3.0)),
        lambda: gaussian_heatmaps(torch.zeros(1, 1, 2), (8, 8, 8), 2.0),
        lambda: gaussian_heatmaps(torch.zeros(1, 2), (8, 8), 2.0),
        lambda: decode_heatmaps(torch.zeros(1, 1, 8, 8), "mean"),
        lambda: decode_heatmaps(torch.zeros(8, 8)),
        lambda: points_at_stride(torch.zeros(1, 1, 2), (2, 2, 2)),
        lambda: deep_supervision_targets(torch.zeros(1, 1, 2), [(8, 8)], [1, 2], [2.0]),
    ],
)
def test_invalid_arguments_raise_value_errors(call):
    with pytest.raises(ValueError):
        call()


def test_stride_mapping_values_and_round_trip():
    points = torch.tensor([[[0.5, 1.5, 0.0], [2.5, 7.5, 3.0]]])
    mapped = points_at_stride(points, (2, 4, 1))
    torch.testing.assert_close(mapped, torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.5, 3.0]]]))
    generator = torch.Generator().manual_seed(6)
    random = torch.rand(3, 5, 3, generator=generator) * 100
    for stride in (2, (1, 2, 2), (4, 2, 8)):
        torch.testing.assert_close(
            points_from_stride(points_at_stride(random, stride), stride), random
        )
    torch.testing.assert_close(points_at_stride(random, 1), random)


@pytest.mark.parametrize("ndim", [2, 3])
def test_stride_2_target_peaks_where_the_pooled_full_resolution_target_does(ndim):
    generator = torch.Generator().manual_seed(7)
    side = 48 if ndim == 2 else 24
    stride = (2,) * ndim if ndim == 2 else (1, 2, 2)
    points = random_points(generator, 1, 12, ndim, side, margin=8).float()
    low_shape = tuple(side // s for s in stride)
    (full, low), present = deep_supervision_targets(
        points, [(side,) * ndim, low_shape], [1, stride], [4.0, [4.0 / s for s in stride]]
    )
    assert present.all() and low.shape == (1, 12, *low_shape)
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    pooled = pool(full, kernel_size=stride)
    expected = points_at_stride(points, stride)
    from_pooled = decode_heatmaps(pooled).points
    from_target = decode_heatmaps(low).points
    assert (from_target - expected).norm(dim=-1).max() < 0.01
    assert (from_pooled - expected).norm(dim=-1).max() < 0.05
    assert (points_from_stride(from_target, stride) - points).norm(dim=-1).max() < 0.05


def test_batches_decode_like_single_samples():
    generator = torch.Generator().manual_seed(8)
    points = random_points(generator, 3, 4, 2, 30, margin=5).float()
    heatmaps, _ = gaussian_heatmaps(points, (30, 30), 2.0)
    heatmaps = heatmaps + 0.03 * torch.randn(heatmaps.shape, generator=generator)
    together = decode_heatmaps(heatmaps)
    for b in range(3):
        alone = decode_heatmaps(heatmaps[b : b + 1])
        torch.testing.assert_close(together.points[b], alone.points[0])
        torch.testing.assert_close(together.peak[b], alone.peak[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_heatmaps_decode_in_float32(dtype):
    generator = torch.Generator().manual_seed(9)
    points = random_points(generator, 1, 20, 3, 24, margin=6).float()
    heatmaps, _ = gaussian_heatmaps(points, (24, 24, 24), 3.0, dtype=dtype)
    decoded = decode_heatmaps(heatmaps)
    assert decoded.points.dtype == decoded.peak.dtype == decoded.spread.dtype == torch.float32
    assert (decoded.points - points).norm(dim=-1).max() < (
        0.05 if dtype == torch.bfloat16 else 0.01
    )


def test_spread_measures_the_blob_width_per_axis():
    points = torch.tensor([[[20.3, 19.6], [20.0, 20.0]]])
    heatmaps, _ = gaussian_heatmaps(points, (40, 40), torch.tensor([[2.0, 4.0], [1.5, 1.5]]))
    decoded = decode_heatmaps(heatmaps)
    torch.testing.assert_close(
        decoded.spread_per_axis[0, 0], torch.tensor([2.0, 4.0]), rtol=0.1, atol=0
    )
    assert decoded.spread[0, 0].item() == pytest.approx(math.sqrt((4 + 16) / 2), rel=0.1)
    assert decoded.spread[0, 1] < decoded.spread[0, 0]


def test_peak_on_the_border_is_not_refined_along_that_axis_and_stays_inside():
    points = torch.tensor([[[0.0, 7.4], [15.0, 3.3]]])
    heatmaps, _ = gaussian_heatmaps(points, (16, 16), 1.0)
    for method in REFINED:
        decoded = decode_heatmaps(heatmaps, method)
        if method == "quadratic":
            assert decoded.points[0, :, 0].tolist() == [0.0, 15.0]
        assert (decoded.points[..., 0] >= -0.5).all() and (decoded.points[..., 0] <= 15.5).all()
        assert (decoded.points[..., 1] - points[..., 1]).abs().max() < 0.05


def test_gaussian_fit_follows_a_landmark_just_outside_the_border():
    points = torch.tensor([[[-0.3, 8.0]]])
    heatmaps, _ = gaussian_heatmaps(points, (16, 16), 2.0)
    decoded = decode_heatmaps(heatmaps, "gaussian_fit")
    assert decoded.points[0, 0, 0].item() == pytest.approx(-0.3, abs=0.02)


def test_default_method_beats_argmax_on_noisy_blobs():
    generator = torch.Generator().manual_seed(11)
    points = random_points(generator, 1, 200, 2, 40, margin=10).float()
    heatmaps, _ = gaussian_heatmaps(points, (40, 40), 3.0)
    heatmaps = heatmaps + 0.05 * torch.randn(heatmaps.shape, generator=generator)
    errors = {
        method: (decode_heatmaps(heatmaps, method).points - points).norm(dim=-1).mean().item()
        for method in ("auto", "argmax")
    }
    assert errors["auto"] < 0.12 and errors["auto"] < errors["argmax"] / 4


def test_calibration_separates_present_from_missing_peaks():
    rng = np.random.default_rng(12)
    present = rng.uniform(0.55, 1.0, 300)
    missing = rng.uniform(0.0, 0.3, 60)
    peaks = np.concatenate([present, missing])
    truth = np.concatenate([np.ones(300, bool), np.zeros(60, bool)])
    threshold = calibrate_presence_threshold(torch.tensor(peaks), torch.tensor(truth))
    assert missing.max() < threshold <= present.min()
    assert threshold == pytest.approx((missing.max() + present.min()) / 2)


def test_calibration_balances_overlapping_distributions():
    rng = np.random.default_rng(13)
    present = rng.normal(0.7, 0.1, 5000)
    missing = rng.normal(0.3, 0.1, 500)  # the minority class still counts half
    peaks = np.concatenate([present, missing])
    truth = np.concatenate([np.ones(5000, bool), np.zeros(500, bool)])
    assert calibrate_presence_threshold(peaks, truth) == pytest.approx(0.5, abs=0.04)


def test_calibration_without_missing_examples_is_conservative():
    peaks = np.array([[0.9, 0.6], [0.8, np.nan]])
    assert calibrate_presence_threshold(peaks, np.ones((2, 2), bool)) == pytest.approx(0.3)
    above = calibrate_presence_threshold([0.1, 0.2], [False, False])
    assert above > 0.2 and above == pytest.approx(0.2)
    with pytest.raises(ValueError):
        calibrate_presence_threshold([np.nan], [True])
