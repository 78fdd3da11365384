"""PNG overlays of predicted (and true) landmarks on their image, in physical proportions.

Images are drawn in array layout (axis 0 = rows), each pixel ``spacing`` millimetres tall and
wide, so anisotropic spacing does not distort anatomy; points are placed at the continuous
array indices that :func:`medlandmark.io.geometry.world_to_index` gives. 3D overlays show, for
each landmark, the three array-axis slices through its nearest voxel, oriented so that superior
and anterior are up when the image direction allows.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse

from medlandmark.errors import MedlandmarkError
from medlandmark.io.files import atomic_write_bytes
from medlandmark.io.geometry import Geometry, world_to_index
from medlandmark.io.images import ImageData
from medlandmark.io.landmarks import LandmarkSet

PREDICTION_COLOUR = "#ff2020"
TRUTH_COLOUR = "#20e020"
LINK_COLOUR = "#ffd000"
TEXT_COLOUR = "#ffffff"
DPI = 100
FIGURE_WIDTH_2D_IN = 8.0
PANEL_SIZE_3D_IN = 2.6
HEADER_LINE_IN = 0.2
WINDOW_PERCENTILES = (0.5, 99.5)
# panel title for a slice normal to world x, y, z (LPS)
PLANE_NAMES = ("sagittal", "coronal", "axial")
LABEL_FONT_SIZE_2D = 8
LABEL_DISTANCES = (5.0, 12.0, 22.0)  # points from the landmark to its label, tried in turn
LABEL_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))


def overlay_2d(
    image: ImageData,
    landmarks: LandmarkSet,
    out_path: str | Path,
    truth: LandmarkSet | None = None,
    title: str | None = None,
) -> Path:
    """Write :func:`figure_2d` as a PNG (atomically); returns ``out_path``."""
    return _save(figure_2d(image, landmarks, truth, title), out_path)


def overlay_3d(
    image: ImageData,
    landmarks: LandmarkSet,
    out_path: str | Path,
    truth: LandmarkSet | None = None,
    max_landmarks: int | None = None,
    title: str | None = None,
) -> Path:
    """Write :func:`figure_3d` as a PNG (atomically); returns ``out_path``."""
    return _save(figure_3d(image, landmarks, truth, max_landmarks, title), out_path)


def overlay_comparison(
    image: ImageData,
    prediction: LandmarkSet,
    truth: LandmarkSet,
    out_path: str | Path,
    focus: str | None = None,
    title: str | None = None,
) -> Path:
    """PNG of predicted and true landmarks with a colour legend: the whole image in 2D; in 3D the
    three orthogonal slices through the predicted ``focus`` (default: the largest error)."""
    if image.ndim == 2:
        figure = figure_2d(image, prediction, truth, title)
    else:
        focus = focus or largest_error_landmark(prediction, truth)
        if focus is None:
            figure = figure_3d(image, prediction, truth, max_landmarks=1, title=title)
        else:
            figure = figure_3d(image, _only(prediction, focus), _only(truth, focus), title=title)
    figure.legend(
        handles=_legend_handles(),
        loc="lower right" if image.ndim == 2 else "upper right",
        ncol=3,
        fontsize=8,
        framealpha=0.85,
    )
    return _save(figure, out_path)


def largest_error_landmark(prediction: LandmarkSet, truth: LandmarkSet) -> str | None:
    """Name of the landmark predicted farthest from its true position (None when no landmark
    is in both sets)."""
    errors = {
        name: float(np.linalg.norm(prediction.points_mm[k] - truth.points_mm[t]))
        for k, name in enumerate(prediction.names)
        if prediction.present[k] and (t := _truth_row(truth, name)) is not None
    }
    return max(errors, key=errors.get) if errors else None


def figure_2d(
    image: ImageData,
    landmarks: LandmarkSet,
    truth: LandmarkSet | None = None,
    title: str | None = None,
) -> Figure:
    """The (first channel of the) 2D image with the predicted points, named (with their
    confidence when known), the true points linked to them, and missing points listed."""
    geometry = image.geometry
    _check_dims(image, landmarks, truth, 2)
    rows, cols = geometry.shape
    height_mm, width_mm = geometry.extent_mm
    figure = Figure(figsize=_fitted_size(FIGURE_WIDTH_2D_IN, height_mm / width_mm), dpi=DPI)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    low, high = display_window(image.array[0])
    axes.imshow(
        image.array[0],
        cmap="gray",
        vmin=low,
        vmax=high,
        interpolation="nearest",
        aspect=geometry.spacing_mm[0] / geometry.spacing_mm[1],
        origin="upper",
    )
    axes.set_xlim(-0.5, cols - 0.5)
    axes.set_ylim(rows - 0.5, -0.5)
    axes.set_axis_off()
    predicted = world_to_index(landmarks.points_mm, geometry)
    true = None if truth is None else world_to_index(truth.points_mm, geometry)
    shown = [k for k in range(len(landmarks.names)) if landmarks.present[k]]
    labels = [_label(landmarks, k) for k in shown]
    at_points = axes.transData.transform(predicted[shown][:, ::-1]) * 72.0 / DPI
    offsets = label_offsets(at_points, labels, LABEL_FONT_SIZE_2D)
    for k, label, offset in zip(shown, labels, offsets, strict=True):
        name = landmarks.names[k]
        row, col = predicted[k]
        _mark_prediction(axes, col, row, label, fontsize=LABEL_FONT_SIZE_2D, offset=offset)
        _draw_error_bound(axes, landmarks, k, (col, row), geometry.spacing_mm)
        t = _truth_row(truth, name)
        if t is not None:
            axes.plot([col, true[t][1]], [row, true[t][0]], color=LINK_COLOUR, linewidth=0.8)
    if truth is not None:
        shown = truth.present & ~np.isnan(true).any(axis=1)
        axes.scatter(
            true[shown, 1], true[shown, 0], s=30, marker="x", color=TRUTH_COLOUR, linewidths=1.2
        )
    notes = _missing_note(landmarks)
    if title:
        notes = [title, *notes]
    if notes:
        _corner_text(axes, "\n".join(notes))
    return figure


def figure_3d(
    image: ImageData,
    landmarks: LandmarkSet,
    truth: LandmarkSet | None = None,
    max_landmarks: int | None = None,
    title: str | None = None,
) -> Figure:
    """One row per present landmark (at most ``max_landmarks``, the others listed): the three
    orthogonal slices through it with the point marked (and the true point, projected, linked)."""
    geometry = image.geometry
    _check_dims(image, landmarks, truth, 3)
    present = [k for k in range(len(landmarks.names)) if landmarks.present[k]]
    shown = present if max_landmarks is None else present[: max(0, int(max_landmarks))]
    notes = _missing_note(landmarks)
    if len(shown) < len(present):
        hidden = [landmarks.names[k] for k in present[len(shown) :]]
        notes.append(f"not shown ({len(hidden)}): {', '.join(hidden)}")
    if not shown:
        notes.insert(0, "no landmark predicted")
    header = ([title] if title else []) + notes
    n_rows = max(1, len(shown))
    header_in = HEADER_LINE_IN * len(header) + 0.1
    height_in = n_rows * PANEL_SIZE_3D_IN + header_in
    figure = Figure(figsize=(3 * PANEL_SIZE_3D_IN, height_in), dpi=DPI)
    grid = figure.add_gridspec(
        n_rows,
        3,
        hspace=0.3,
        wspace=0.05,
        left=0.02,
        right=0.98,
        bottom=0.3 / height_in,
        top=1.0 - (header_in + 0.2) / height_in,
    )
    volume = image.array[0]
    window = display_window(volume)
    predicted = world_to_index(landmarks.points_mm, geometry)
    true = None if truth is None else world_to_index(truth.points_mm, geometry)
    for row, k in enumerate(shown):
        t = _truth_row(truth, landmarks.names[k])
        truth_index = None if t is None else true[t]
        label = _label(landmarks, k)
        if t is not None:
            label += f"  error {np.linalg.norm(landmarks.points_mm[k] - truth.points_mm[t]):.1f} mm"
        for normal in range(3):
            axes = figure.add_subplot(grid[row, normal])
            _slice_panel(axes, volume, geometry, normal, predicted[k], truth_index, window)
            if normal == 0:
                axes.set_title(label, loc="left", fontsize=9)
    if header:
        figure.text(
            0.02, 1.0 - 0.05 / height_in, "\n".join(header), fontsize=9, va="top", wrap=True
        )
    return figure


def display_window(array: np.ndarray) -> tuple[float, float]:
    """Grey-level window: robust percentiles of the finite values (a flat image gets 0..1)."""
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, WINDOW_PERCENTILES))
    if high <= low:
        return low, low + 1.0
    return low, high


def slice_axes(normal: int) -> tuple[int, int]:
    """The array axes shown as (rows, columns) of the slice normal to array axis ``normal``."""
    rows, cols = (axis for axis in range(3) if axis != normal)
    return rows, cols


def _slice_panel(
    axes,
    volume: np.ndarray,
    geometry: Geometry,
    normal: int,
    point: np.ndarray,
    truth: np.ndarray | None,
    window: tuple[float, float],
) -> None:
    """The slice through ``point`` (array index) normal to array axis ``normal``, point marked."""
    row_axis, col_axis = slice_axes(normal)
    position = int(np.clip(np.rint(point[normal]), 0, geometry.shape[normal] - 1))
    plane = np.take(volume, position, axis=normal)  # axes (row_axis, col_axis), in order
    spacing = geometry.spacing_mm
    axes.imshow(
        plane,
        cmap="gray",
        vmin=window[0],
        vmax=window[1],
        interpolation="nearest",
        aspect=spacing[row_axis] / spacing[col_axis],
        origin="upper",
    )
    rows, cols = plane.shape
    up_is_first_row, left_is_first_col = _orientation(geometry, row_axis, col_axis)
    axes.set_ylim((rows - 0.5, -0.5) if up_is_first_row else (-0.5, rows - 0.5))
    axes.set_xlim((-0.5, cols - 0.5) if left_is_first_col else (cols - 0.5, -0.5))
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_xlabel(f"{_plane_name(geometry, normal)} {position}", fontsize=7)
    if truth is not None:
        axes.plot(
            [point[col_axis], truth[col_axis]],
            [point[row_axis], truth[row_axis]],
            color=LINK_COLOUR,
            linewidth=0.8,
        )
        axes.scatter(
            [truth[col_axis]],
            [truth[row_axis]],
            s=30,
            marker="x",
            color=TRUTH_COLOUR,
            linewidths=1.2,
        )
    _mark_prediction(axes, point[col_axis], point[row_axis], None)


def _orientation(geometry: Geometry, row_axis: int, col_axis: int) -> tuple[bool, bool]:
    """Whether the first row is drawn at the top and the first column at the left, so that
    superior (else anterior) is up and the patient's right is on the viewer's left."""
    direction = geometry.direction_matrix
    row_world = int(np.argmax(np.abs(direction[:, row_axis])))
    row_sign = direction[row_world, row_axis]
    # LPS: +z is superior (want it up: first row at the bottom), +y posterior (want it down)
    up_is_first_row = row_sign < 0 if row_world == 2 else row_sign > 0
    col_world = int(np.argmax(np.abs(direction[:, col_axis])))
    col_sign = direction[col_world, col_axis]
    # +x is the patient's left (want it right); on sagittal slices +y posterior goes right
    left_is_first_col = col_sign > 0 if col_world in (0, 1) else col_sign < 0
    return up_is_first_row, left_is_first_col


def _plane_name(geometry: Geometry, normal: int) -> str:
    world = int(np.argmax(np.abs(geometry.direction_matrix[:, normal])))
    return f"{PLANE_NAMES[world]} slice"


def label_offsets(
    points: np.ndarray, labels: list[str], fontsize: float
) -> list[tuple[float, float]]:
    """An offset (points) for each label next to its point ``(x, y)`` in points, up = +y: the
    first of eight directions, at growing distances, whose box (estimated from the text's
    length) overlaps no label placed before it nor any point; the least crowded otherwise."""
    width = [0.6 * fontsize * max(1, len(t)) + 4 for t in labels]
    height = 1.3 * fontsize + 2
    placed: list[tuple[float, float, float, float]] = []
    dots = [(x - 3, y - 3, x + 3, y + 3) for x, y in np.asarray(points, dtype=float)]
    chosen = []
    for (x, y), w in zip(np.asarray(points, dtype=float), width, strict=True):
        best, best_overlap = (5.0, 4.0), math.inf
        for distance in LABEL_DISTANCES:
            for dx, dy in LABEL_DIRECTIONS:
                left = x + dx * distance - (w if dx < 0 else 0 if dx > 0 else w / 2)
                bottom = y + dy * distance - (height if dy < 0 else 0 if dy > 0 else height / 2)
                box = (left, bottom, left + w, bottom + height)
                overlap = sum(_overlap(box, other) for other in (*placed, *dots))
                if overlap < best_overlap:
                    best, best_overlap = (left - x, bottom - y), overlap
            if best_overlap == 0:
                break
        chosen.append(best)
        placed.append((x + best[0], y + best[1], x + best[0] + w, y + best[1] + height))
    return chosen


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Area shared by two boxes (left, bottom, right, top)."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _mark_prediction(
    axes,
    x: float,
    y: float,
    label: str | None,
    fontsize: int = 7,
    offset: tuple[float, float] = (5.0, 4.0),
) -> None:
    axes.scatter(
        [x], [y], s=36, marker="o", facecolors="none", edgecolors=PREDICTION_COLOUR, linewidths=1.5
    )
    axes.scatter([x], [y], s=4, marker="o", color=PREDICTION_COLOUR)
    if label:
        axes.annotate(
            label,
            (x, y),
            xytext=offset,
            textcoords="offset points",
            va="bottom",
            ha="left",
            color=TEXT_COLOUR,
            fontsize=fontsize,
            bbox={"boxstyle": "round,pad=0.15", "fc": "black", "alpha": 0.5, "lw": 0},
        )


def _draw_error_bound(
    axes, landmarks: LandmarkSet, k: int, at: tuple[float, float], spacing_mm: Sequence[float]
) -> None:
    """The point's error bound as a dashed circle in mm (an ellipse in pixels of unequal
    spacing), when the prediction carries one."""
    bounds = landmarks.error_bound_mm
    if bounds is None or not np.isfinite(bounds[k]):
        return
    row_mm, col_mm = spacing_mm
    axes.add_patch(
        Ellipse(
            at,
            2 * bounds[k] / col_mm,
            2 * bounds[k] / row_mm,
            fill=False,
            edgecolor=PREDICTION_COLOUR,
            linewidth=0.8,
            linestyle="--",
            alpha=0.8,
        )
    )


def _legend_handles() -> list[Line2D]:
    return [
        Line2D(
            [],
            [],
            linestyle="none",
            marker="o",
            markersize=7,
            markerfacecolor="none",
            markeredgecolor=PREDICTION_COLOUR,
            markeredgewidth=1.5,
            label="prediction",
        ),
        Line2D(
            [],
            [],
            linestyle="none",
            marker="x",
            markersize=7,
            color=TRUTH_COLOUR,
            markeredgewidth=1.5,
            label="ground truth",
        ),
        Line2D([], [], color=LINK_COLOUR, linewidth=1.2, label="error"),
    ]


def _only(landmarks: LandmarkSet, name: str) -> LandmarkSet:
    """The set reduced to the landmark ``name`` (confidence kept; missing if not in the set)."""
    if name not in landmarks.names:
        return LandmarkSet([name], np.full((1, landmarks.ndim), np.nan))
    k = landmarks.names.index(name)
    confidence = None if landmarks.confidence is None else np.asarray(landmarks.confidence)[[k]]
    return LandmarkSet([name], landmarks.points_mm[[k]], confidence=confidence)


def _label(landmarks: LandmarkSet, k: int) -> str:
    """The landmark's name, with its confidence when the set carries one."""
    name = landmarks.names[k]
    if landmarks.confidence is None:
        return name
    confidence = float(np.asarray(landmarks.confidence, dtype=float)[k])
    return name if not np.isfinite(confidence) else f"{name} ({confidence:.2f})"


def _truth_row(truth: LandmarkSet | None, name: str) -> int | None:
    """Row of ``name`` in ``truth`` when it is there and present."""
    if truth is None or name not in truth.names:
        return None
    t = truth.names.index(name)
    return t if truth.present[t] else None


def _missing_note(landmarks: LandmarkSet) -> list[str]:
    missing = [n for n, p in zip(landmarks.names, landmarks.present, strict=True) if not p]
    return [f"missing ({len(missing)}): {', '.join(missing)}"] if missing else []


def _corner_text(axes, text: str) -> None:
    axes.text(
        0.01,
        0.99,
        text,
        transform=axes.transAxes,
        va="top",
        ha="left",
        color=TEXT_COLOUR,
        fontsize=8,
        wrap=True,
        bbox={"boxstyle": "round,pad=0.3", "fc": "black", "alpha": 0.6, "lw": 0},
    )


def _check_dims(
    image: ImageData, landmarks: LandmarkSet, truth: LandmarkSet | None, ndim: int
) -> None:
    if image.ndim != ndim:
        raise MedlandmarkError(f"overlay_{ndim}d needs a {ndim}D image, got {image.ndim}D")
    for points in (landmarks, truth):
        if points is not None and points.ndim != ndim:
            raise MedlandmarkError(
                f"landmarks have {points.ndim} coordinates, the image is {ndim}D"
            )


def _fitted_size(width_in: float, aspect: float) -> tuple[float, float]:
    """Figure size of ``width_in`` inches with height/width ``aspect`` (height within 2..16 in)."""
    height = float(np.clip(width_in * aspect, 2.0, 16.0))
    return min(height / aspect, 16.0), height


def _save(figure: Figure, out_path: str | Path) -> Path:
    """Render ``figure`` to PNG and write it atomically."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    atomic_write_bytes(out_path, buffer.getvalue())
    return Path(out_path)
