"""`medlandmark demo`: the pipeline end to end on a built-in synthetic dataset.

For now: make the dataset -> check it -> evaluate stand-in predictions (the ground truth
displaced by a known amount, one landmark dropped) so the metrics can be verified by eye.
Training and prediction replace the stand-in as they are built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlandmark.console import info
from medlandmark.datasets.check import check_dataset, print_check_report
from medlandmark.datasets.dataset import Dataset
from medlandmark.datasets.synthetic import make_synthetic_dataset
from medlandmark.evaluation import evaluate, print_summary
from medlandmark.io.landmarks import LandmarkSet, write_landmarks

STAND_IN_ERROR_MM = 1.0


def write_stand_in_predictions(dataset: Dataset, case_ids: list[str], out: Path, seed: int = 0) -> None:
    """Ground truth moved by exactly ``STAND_IN_ERROR_MM`` in a random direction per point; the
    first landmark of the first case is reported missing."""
    rng = np.random.default_rng(seed)
    for number, case_id in enumerate(case_ids):
        truth = dataset.read_landmarks(case_id)
        directions = rng.normal(size=truth.points_mm.shape)
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        points_mm = truth.points_mm + STAND_IN_ERROR_MM * directions
        if number == 0:
            points_mm[0] = np.nan
        write_landmarks(out / f"{case_id}.json", LandmarkSet(truth.names, points_mm))


def run_demo(out: str | Path) -> int:
    """Run the walk-through into ``out``; returns the exit code."""
    out = Path(out)
    info(f"[bold]1/3 make a synthetic 2D dataset[/bold] -> {out / 'dataset'}")
    root = make_synthetic_dataset(out / "dataset")
    info("[bold]2/3 check it[/bold]")
    report = check_dataset(root)
    print_check_report(report)
    if not report.ok:
        return 1
    dataset = Dataset(root)
    test_ids = dataset.split("test")
    info(
        f"[bold]3/3 evaluate stand-in predictions[/bold] for {len(test_ids)} test cases "
        f"(ground truth moved by {STAND_IN_ERROR_MM} mm, one landmark dropped: expect MRE "
        f"{STAND_IN_ERROR_MM:.2f} mm and one false 'missing')"
    )
    predictions = out / "predictions"
    write_stand_in_predictions(dataset, test_ids, predictions)
    metrics = evaluate(predictions, root, out / "evaluation")
    print_summary(metrics, out / "evaluation")
    return 0
