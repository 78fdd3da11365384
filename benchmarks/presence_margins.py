"""Offline: would a margin at the field of view's edge fix "missing" on a set already predicted?

Reads the landmark files of a prediction folder, the set's ground truth and image headers, and
the run's shape model; prints missing precision and recall when a present point is called
missing (a) within X mm of the volume's edge, (b) when the shape fit expects it inside by less
than its RMS residual + X. Run on a validation set (afids_shift.py's strong-seed2).

    .venv/bin/python benchmarks/presence_margins.py \\
        benchmarks/work/afids3d/cpu-unet/shift/strong-seed2/shape/predictions \\
        benchmarks/work/afids3d/cpu-unet/shift/datasets/strong-seed2 \\
        benchmarks/work/afids3d/cpu-unet/runs/3d_coarse
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medlandmark.datasets.dataset import Dataset
from medlandmark.io.images import read_image
from medlandmark.io.landmarks import read_landmarks
from medlandmark.records.run import read_run_record
from medlandmark.shape_model import ShapeModel

MARGINS_MM = (0, 1, 2, 3, 4, 6)


def case_depths(prediction: Path, dataset: Dataset, model: ShapeModel) -> tuple:
    """Truly missing, predicted present, depth of the found point, depth of the expected point
    minus the fit's RMS (mm), for one case's landmarks."""
    case = dataset.case(prediction.name.split(".")[0])
    geometry = read_image(case.image_path).geometry
    found = read_landmarks(prediction, geometry=geometry)
    truth = read_landmarks(case.landmarks_path, geometry=geometry)
    present = found.present
    points = np.where(present[:, None], found.points_mm, np.nan)
    fit = model.expected(points, present)
    expected = np.full(len(points), np.inf)
    if fit is not None:
        expected = geometry.depth_inside_mm(fit.expected_mm) - fit.rms_mm
    own = np.where(present, geometry.depth_inside_mm(np.nan_to_num(points)), np.inf)
    return ~truth.present, present, own, expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("run", type=Path, help="the first stage's run (its shape model)")
    args = parser.parse_args()
    dataset = Dataset(args.dataset)
    model = ShapeModel.from_dict(read_run_record(args.run).shape_model.model_dump())
    cases = [case_depths(p, dataset, model) for p in sorted(args.predictions.glob("*.json"))]
    missing, present, own, expected = (np.concatenate(c) for c in zip(*cases, strict=True))
    print("| margin X (mm) | rule | missing precision | missing recall |")
    for margin in MARGINS_MM:
        for name, depth in (
            ("found point within X of the edge", own),
            ("expected < RMS + X", expected),
        ):
            said = ~present | (depth < margin)
            tp, fp = (missing & said).sum(), (~missing & said).sum()
            fn = (missing & ~said).sum()
            print(
                f"| {margin} | {name} | {tp / max(tp + fp, 1):.3f} | {tp / max(tp + fn, 1):.3f} |"
            )


if __name__ == "__main__":
    main()
