"""The synthetic dataset: deterministic, landmarks on the shape's features, readable as a dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlandmark.datasets.dataset import Dataset
from medlandmark.datasets.synthetic import (
    SYNTHETIC_LANDMARKS,
    make_synthetic_dataset,
    synthetic_case,
)
from medlandmark.io.geometry import world_to_index


def test_same_seed_same_case_and_different_seeds_differ() -> None:
    image_a, landmarks_a = synthetic_case(5)
    image_b, landmarks_b = synthetic_case(5)
    image_c, landmarks_c = synthetic_case(6)
    assert np.array_equal(image_a, image_b) and np.array_equal(landmarks_a, landmarks_b)
    assert not np.allclose(landmarks_a, landmarks_c)


def test_landmarks_lie_on_the_bright_shape() -> None:
    for seed in range(5):
        image, landmarks_xy = synthetic_case(seed)
        background = np.median(image[:8, :8])
        columns, rows = np.round(landmarks_xy).astype(int).T
        assert (image[rows, columns].astype(float) > background + 25).all(), seed


def test_dataset_reads_back_in_mm(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path / "synth", num_cases=4, size_px=64, spacing_mm=0.5, seed=3
    )
    dataset = Dataset(root)
    assert dataset.case_ids == ["case000", "case001", "case002", "case003"]
    image = dataset.read_image("case001")
    landmarks = dataset.read_landmarks("case001", image)
    assert landmarks.names == SYNTHETIC_LANDMARKS
    _, expected_xy = synthetic_case(3 * 100_003 + 1, 64)
    np.testing.assert_allclose(
        world_to_index(landmarks.points_mm, image.geometry), expected_xy[:, ::-1], atol=1e-9
    )
    assert image.geometry.spacing_mm == (0.5, 0.5)
