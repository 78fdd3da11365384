"""Offline: should the `shape` presence rule fall back on peak heights when a case has no
plausible shape fit?

The `shape` rule keeps every landmark above a low floor of its case's relative peak height and
leaves "missing" to the shape fit's field-of-view test. A case whose landmarks fit no plausible
shape (no fit at all, a mirrored one or one turned beyond the training cases) has no such test:
every landmark above the floor is reported present. This script replays the decision from the
landmark files of prediction folders already made with `--presence shape` (their positions and
confidences, missing ones included) and prints missing precision and recall with and without
the fallback to the run's absolute threshold, per set and over all. Run it on validation sets.

    .venv/bin/python benchmarks/presence_fallback.py benchmarks/work/afids3d/cpu-unet/runs/3d_coarse \\
        benchmarks/work/afids3d/cpu-unet/shift/strong-seed2/shape/predictions:benchmarks/work/afids3d/cpu-unet/shift/datasets/strong-seed2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medlandmark.datasets.dataset import Dataset
from medlandmark.heatmaps import relative_confidences
from medlandmark.inference.predictor import SHAPE_RULE_FLOOR
from medlandmark.io.images import read_image_info
from medlandmark.io.landmarks import read_landmarks
from medlandmark.records.run import read_run_record
from medlandmark.shape_model import ShapeModel, cut_off_by


def replayed(
    prediction: Path, dataset: Dataset, model: ShapeModel, threshold: float, fallback: bool
):
    """(truly missing, said missing) for one predicted case, decided again from its file."""
    case = dataset.case(prediction.name.split(".")[0])
    geometry = read_image_info(case.image_path).geometry
    landmarks = json.loads(prediction.read_text())["landmarks"]
    points = np.array([entry["position"] for entry in landmarks], dtype=np.float64)
    confidence = np.array([entry["confidence"] for entry in landmarks], dtype=np.float64)
    present = relative_confidences(confidence) >= SHAPE_RULE_FLOOR
    fit = model.expected(points, present)
    if fallback and not model.plausible(fit):
        present &= confidence >= threshold
    else:
        present &= ~cut_off_by(fit, geometry, len(points))
    present &= ~(geometry.depth_inside_mm(points) < 0)
    truth = read_landmarks(case.landmarks_path, geometry=geometry)
    return ~truth.present, ~present


def scores(pairs) -> tuple[float, float]:
    missing, said = (np.concatenate(x) for x in zip(*pairs, strict=True))
    tp, fp, fn = (missing & said).sum(), (~missing & said).sum(), (missing & ~said).sum()
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the first stage's run (shape model, threshold)")
    parser.add_argument("sets", nargs="+", help="PREDICTIONS:DATASET of each validation set")
    args = parser.parse_args()
    record = read_run_record(args.run)
    model = ShapeModel.from_dict(record.shape_model.model_dump())
    threshold = record.presence_threshold
    print("| set | fallback | missing precision | missing recall | worse of the two |")
    print("|---|---|---|---|---|")
    every = {False: [], True: []}
    for pair in args.sets:
        predictions, data = (Path(p) for p in pair.split(":"))
        dataset, files = Dataset(data), sorted(predictions.glob("*.json"))
        for fallback in (False, True):
            pairs = [replayed(p, dataset, model, threshold, fallback) for p in files]
            every[fallback] += pairs
            precision, recall = scores(pairs)
            print(
                f"| {data.name} | {fallback} | {precision:.3f} | {recall:.3f} | {min(precision, recall):.3f} |"
            )
    for fallback, pairs in every.items():
        precision, recall = scores(pairs)
        print(
            f"| all | {fallback} | {precision:.3f} | {recall:.3f} | {min(precision, recall):.3f} |"
        )


if __name__ == "__main__":
    main()
