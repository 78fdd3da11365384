"""`medlandmark demo`: the whole pipeline, end to end, on an embedded default.

check -> plan -> preprocess -> train -> predict -> evaluate, with a small configuration sized
for a CPU, on a procedural synthetic dataset (2D hands by default, 3D bodies with ``--3d``) or
on ISBI 2015 cephalograms when their folder is given. Every step is the one a user runs by hand;
the demo only chooses small sizes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from medlandmark.console import info
from medlandmark.datasets.check import check_dataset, print_check_report
from medlandmark.datasets.converters import convert_isbi2015
from medlandmark.datasets.dataset import Dataset
from medlandmark.datasets.synthetic import make_synthetic_dataset, make_synthetic_volume_dataset
from medlandmark.evaluation import evaluate, print_summary
from medlandmark.inference.batch import predict_files
from medlandmark.planning import plan_dataset
from medlandmark.preprocessing import preprocess_dataset
from medlandmark.training.loop import TrainOptions, train


@dataclass(frozen=True)
class DemoRecipe:
    """The small sizes of one demo: the plan's budget and the training length."""

    gpu_memory_gb: float
    base_features: int
    epochs: int
    iterations_per_epoch: int
    batch_size: int
    learning_rate: float
    test_split: str
    max_test_cases: int | None = None


RECIPES = {
    "2d": DemoRecipe(1.0, 16, 16, 50, 8, 3e-3, "test"),
    "3d": DemoRecipe(1.0, 8, 30, 50, 4, 3e-3, "test"),
    "isbi2015": DemoRecipe(1.0, 16, 8, 50, 4, 2e-3, "test1", max_test_cases=25),
}


def make_demo_dataset(kind: str, out: Path, isbi2015: Path | None = None) -> Path:
    """The demo's dataset folder: synthetic 2D or 3D, or ISBI 2015 converted from ``isbi2015``."""
    if kind == "2d":
        return make_synthetic_dataset(out, num_cases=40, size_px=64, spacing_mm=1.0)
    if kind == "3d":
        return make_synthetic_volume_dataset(out, num_cases=32, size_vox=24, spacing_mm=2.5)
    return convert_isbi2015(isbi2015, out)


def run_demo(out: str | Path, kind: str = "2d", isbi2015: str | Path | None = None) -> int:
    """Run the walk-through into ``out``; returns the exit code (0 when every step worked)."""
    out, started = Path(out), time.perf_counter()
    kind = "isbi2015" if isbi2015 is not None else kind
    recipe = RECIPES[kind]
    step = _Steps(7)
    step(f"dataset ({kind})", out / "dataset")
    root = make_demo_dataset(
        kind, out / "dataset", Path(isbi2015) if isbi2015 is not None else None
    )
    step("check", root)
    report = check_dataset(root)
    print_check_report(report)
    if not report.ok:
        return 1
    step("plan", root / "preprocessed" / "plans.json")
    plan = plan_dataset(
        root, gpu_memory_gb=recipe.gpu_memory_gb, base_features=recipe.base_features
    )
    configuration = plan.default_configuration
    step("preprocess", root / "preprocessed")
    preprocess_dataset(root, configurations=[configuration])
    step(f"train a U-Net ({configuration}, fold 0)", out / "run")
    options = TrainOptions(
        configuration=configuration,
        epochs=recipe.epochs,
        iterations_per_epoch=recipe.iterations_per_epoch,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        validate_every=recipe.epochs // 2,
    )
    train(root, out / "run", options)
    test_images = _test_images(Dataset(root), recipe)
    step(f"predict {len(test_images)} {recipe.test_split} images", out / "predictions")
    rows = predict_files(out / "run", test_images, out / "predictions")
    step("evaluate against the ground truth", out / "evaluation")
    metrics = evaluate(out / "predictions", root, out / "evaluation")
    print_summary(metrics, out / "evaluation")
    info(f"demo finished in {time.perf_counter() - started:.0f} s")
    _show_shipped_models()
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def _show_shipped_models() -> None:
    """How to predict with a model shipped in the package, without training one."""
    from medlandmark.records.model_card import shipped_models

    for model in shipped_models():
        spacing = f" --spacing {model.card.spacing_mm[0]:g}" if model.card.spacing_mm else ""
        example = "IMAGE.png" if model.card.dimensions == 2 else "SCAN.nii.gz"
        info(
            f"ready-made: {model.name} ({model.card.title}): medlandmark predict --model "
            f"{model.name} {example}{spacing} -o out/   (medlandmark models show {model.name})"
        )


def _test_images(dataset: Dataset, recipe: DemoRecipe) -> list[Path]:
    case_ids = dataset.split(recipe.test_split)[: recipe.max_test_cases]
    return [dataset.case(case_id).image_path for case_id in case_ids]


class _Steps:
    """Numbered step headings: ``[3/7] plan -> PATH``."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def __call__(self, title: str, where: Path) -> None:
        self.done += 1
        info(f"[bold]\\[{self.done}/{self.total}] {escape(title)}[/bold] -> {escape(str(where))}")
