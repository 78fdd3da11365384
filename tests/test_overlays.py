"""Overlays: valid PNGs, drawn in physical proportions, with markers where the landmarks are."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from scipy import ndimage

from medlandmark.errors import MedlandmarkError
from medlandmark.io.geometry import Geometry, index_to_world
from medlandmark.io.images import ImageData
from medlandmark.io.landmarks import LandmarkSet
from medlandmark.overlays import (
    PREDICTION_COLOUR,
    figure_3d,
    overlay_2d,
    overlay_3d,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RED = np.array([int(PREDICTION_COLOUR[i : i + 2], 16) / 255 for i in (1, 3, 5)])


def read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)[..., :3]


def marker_pixels(rgb: np.ndarray) -> np.ndarray:
    return np.abs(rgb - RED).max(axis=-1) < 0.1


def dark_boxes(rgb: np.ndarray, count: int) -> list[tuple[slice, slice]]:
    """Bounding boxes (rows, cols) of the ``count`` largest black regions: the drawn images."""
    labels, n = ndimage.label(rgb.max(axis=-1) < 0.05)
    sizes = ndimage.sum(np.ones_like(labels), labels, index=range(1, n + 1))
    largest = np.argsort(sizes)[::-1][:count] + 1
    boxes = ndimage.find_objects(labels)
    return sorted((boxes[i - 1] for i in largest), key=lambda box: box[1].start)


def expected_pixel(
    box: tuple[slice, slice], fraction_row: float, fraction_col: float
) -> np.ndarray:
    rows, cols = box
    return np.array(
        [
            rows.start + fraction_row * (rows.stop - rows.start),
            cols.start + fraction_col * (cols.stop - cols.start),
        ]
    )


def test_2d_marker_lands_on_the_landmark_in_physical_proportions(tmp_path: Path) -> None:
    # rows 2 mm apart, columns 1 mm: 40 x 60 pixels are 80 mm tall and 60 mm wide
    geometry = Geometry((2.0, 1.0), (5.0, -3.0), ((0.0, 1.0), (1.0, 0.0)), (40, 60))
    image = ImageData(np.zeros((1, 40, 60), np.float32), geometry)
    index = np.array([[10.0, 45.0], [np.nan, np.nan]])
    landmarks = LandmarkSet(
        ["tip", "lost"], index_to_world(index, geometry), confidence=np.array([0.9, np.nan])
    )
    out = overlay_2d(image, landmarks, tmp_path / "case.png")
    rgb = read_png(out)
    [box] = dark_boxes(rgb, 1)
    height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
    assert height / width == pytest.approx(80 / 60, rel=0.03)
    centroid = np.argwhere(marker_pixels(rgb)).mean(axis=0)
    target = expected_pixel(box, (10 + 0.5) / 40, (45 + 0.5) / 60)
    assert np.abs(centroid - target).max() < 2.0, (centroid, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.png"]


def test_2d_with_truth_and_title(tmp_path: Path) -> None:
    geometry = Geometry.identity((32, 32), (0.5, 0.5))
    image = ImageData(np.random.default_rng(0).random((1, 32, 32)), geometry)
    predicted = LandmarkSet(
        ["a", "b"], index_to_world(np.array([[5.0, 5.0], [20.0, 10.0]]), geometry)
    )
    truth = LandmarkSet(["b", "a"], index_to_world(np.array([[22.0, 12.0], [6.0, 4.0]]), geometry))
    out = overlay_2d(image, predicted, tmp_path / "sub" / "case.png", truth=truth, title="case 7")
    rgb = read_png(out)
    green = (rgb[..., 1] > 0.8) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)
    assert green.sum() > 10  # the true points are drawn
    with pytest.raises(MedlandmarkError, match="3 coordinates"):
        overlay_2d(image, LandmarkSet(["a"], np.zeros((1, 3))), tmp_path / "bad.png")


def test_3d_markers_land_on_the_landmark_in_each_slice(tmp_path: Path) -> None:
    # array axes (z, y, x), 3 / 1 / 0.5 mm: every slice is 30 mm on each side
    geometry = Geometry.identity((10, 30, 60), (3.0, 1.0, 0.5))
    image = ImageData(np.zeros((1, 10, 30, 60), np.float32), geometry)
    index = np.array([7.0, 9.0, 40.0])
    landmarks = LandmarkSet(["p"], index_to_world(index[None], geometry))
    rgb = read_png(overlay_3d(image, landmarks, tmp_path / "case.png"))
    boxes = dark_boxes(rgb, 3)
    clusters, n = ndimage.label(ndimage.binary_dilation(marker_pixels(rgb), iterations=3))
    assert n == 3
    centroids = sorted(
        ndimage.center_of_mass(marker_pixels(rgb), clusters, range(1, 4)), key=lambda c: c[1]
    )
    fraction = (index + 0.5) / np.array(geometry.shape)
    # axial (y down, x right); coronal and sagittal with superior (+z) up
    targets = [
        expected_pixel(boxes[0], fraction[1], fraction[2]),
        expected_pixel(boxes[1], 1 - fraction[0], fraction[2]),
        expected_pixel(boxes[2], 1 - fraction[0], fraction[1]),
    ]
    for box in boxes:
        height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
        assert height / width == pytest.approx(1.0, rel=0.05)
    for centroid, target in zip(centroids, targets, strict=True):
        assert np.abs(np.array(centroid) - target).max() < 2.5, (centroid, target)


def test_3d_rows_are_capped_and_the_rest_listed(tmp_path: Path) -> None:
    geometry = Geometry.identity((12, 12, 12), (1.0, 1.0, 1.0))
    image = ImageData(np.random.default_rng(1).random((1, 12, 12, 12)), geometry)
    index = np.array([[2.0, 3.0, 4.0], [np.nan] * 3, [6.0, 6.0, 6.0], [9.0, 1.0, 5.0]])
    landmarks = LandmarkSet(["a", "gone", "c", "d"], index_to_world(index, geometry))
    truth = LandmarkSet(["a"], index_to_world(np.array([[3.0, 3.0, 4.0]]), geometry))
    figure = figure_3d(image, landmarks, truth=truth, max_landmarks=2)
    assert len(figure.axes) == 6
    text = " ".join(t.get_text() for t in figure.texts)
    assert "missing (1): gone" in text and "not shown (1): d" in text
    assert "error 1.0 mm" in figure.axes[0].get_title(loc="left")
    volume = image.array[0]  # the slices through a = (2, 3, 4), then c = (6, 6, 6)
    expected = [volume[2], volume[:, 3], volume[:, :, 4], volume[6], volume[:, 6], volume[:, :, 6]]
    for axes, plane in zip(figure.axes, expected, strict=True):
        np.testing.assert_array_equal(axes.images[0].get_array(), plane)
    assert [a.get_xlabel() for a in figure.axes[:3]] == [
        "axial slice 2",
        "coronal slice 3",
        "sagittal slice 4",
    ]
    all_rows = read_png(overlay_3d(image, landmarks, tmp_path / "all.png", truth=truth))
    capped = read_png(overlay_3d(image, landmarks, tmp_path / "capped.png", max_landmarks=1))
    assert all_rows.shape[0] > 2 * capped.shape[0]
    empty = LandmarkSet(["a"], np.full((1, 3), np.nan))
    assert read_png(overlay_3d(image, empty, tmp_path / "empty.png")).size > 0


def test_labels_of_clustered_points_do_not_overlap() -> None:
    from medlandmark.overlays import _overlap, label_offsets

    points = np.array([[100.0, 100.0], [102.0, 101.0], [99.0, 103.0], [300.0, 300.0]])
    labels = ["sella 0.93", "nasion 0.88", "orbitale 0.71", "far away"]
    offsets = label_offsets(points, labels, 8)
    boxes = []
    for (x, y), (dx, dy), text in zip(points, offsets, labels, strict=True):
        boxes.append((x + dx, y + dy, x + dx + 0.6 * 8 * len(text) + 4, y + dy + 1.3 * 8 + 2))
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert _overlap(boxes[i], boxes[j]) == 0, (labels[i], labels[j])
    assert offsets[3] == (5.0, 5.0)  # a lone point: up and to the right, as always
