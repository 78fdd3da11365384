"""medlandmark: self-configuring anatomical landmark detection in world millimetres.

The public API, imported on first use (``import medlandmark`` loads neither torch nor
matplotlib)::

    import medlandmark as ml

    ml.check_dataset("data/isbi2015")
    plan = ml.plan_dataset("data/isbi2015", gpu_memory_gb=8)
    ml.preprocess_dataset("data/isbi2015")
    record = ml.train("data/isbi2015", "runs/coarse", ml.TrainOptions(configuration="2d_coarse"))
    prediction = ml.Predictor.from_run("runs/coarse").predict("new.png", spacing_xy_mm=(0.1, 0.1))
    ml.write_landmarks("new.json", prediction.landmarks)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from medlandmark.errors import MedlandmarkError

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "check_dataset": "medlandmark.datasets.check",
    "plan_dataset": "medlandmark.planning",
    "load_plan": "medlandmark.records.plan",
    "Plan": "medlandmark.records.plan",
    "preprocess_dataset": "medlandmark.preprocessing",
    "train": "medlandmark.training.loop",
    "TrainOptions": "medlandmark.training.options",
    "RunRecord": "medlandmark.records.run",
    "read_run_record": "medlandmark.records.run",
    "Predictor": "medlandmark.inference.predictor",
    "Prediction": "medlandmark.inference.predictor",
    "predict_files": "medlandmark.inference.batch",
    "PredictOptions": "medlandmark.inference.batch",
    "evaluate": "medlandmark.evaluation",
    "ImageData": "medlandmark.io.images",
    "read_image": "medlandmark.io.images",
    "write_image": "medlandmark.io.images",
    "LandmarkSet": "medlandmark.io.landmarks",
    "read_landmarks": "medlandmark.io.landmarks",
    "write_landmarks": "medlandmark.io.landmarks",
    "Geometry": "medlandmark.io.geometry",
}

__all__ = [  # spelt out for linters; equal to _PUBLIC's names (tested)
    "MedlandmarkError",
    "__version__",
    "check_dataset",
    "plan_dataset",
    "load_plan",
    "Plan",
    "preprocess_dataset",
    "train",
    "TrainOptions",
    "RunRecord",
    "read_run_record",
    "Predictor",
    "Prediction",
    "predict_files",
    "PredictOptions",
    "evaluate",
    "ImageData",
    "read_image",
    "write_image",
    "LandmarkSet",
    "read_landmarks",
    "write_landmarks",
    "Geometry",
]

if TYPE_CHECKING:  # what editors and type checkers see; at run time __getattr__ imports
    from medlandmark.datasets.check import check_dataset
    from medlandmark.evaluation import evaluate
    from medlandmark.inference.batch import PredictOptions, predict_files
    from medlandmark.inference.predictor import Prediction, Predictor
    from medlandmark.io.geometry import Geometry
    from medlandmark.io.images import ImageData, read_image, write_image
    from medlandmark.io.landmarks import LandmarkSet, read_landmarks, write_landmarks
    from medlandmark.planning import plan_dataset
    from medlandmark.preprocessing import preprocess_dataset
    from medlandmark.records.plan import Plan, load_plan
    from medlandmark.records.run import RunRecord, read_run_record
    from medlandmark.training.loop import train
    from medlandmark.training.options import TrainOptions


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'medlandmark' has no attribute '{name}'")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
