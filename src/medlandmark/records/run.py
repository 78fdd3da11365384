"""A run folder: :class:`RunRecord` (``run.json``) and the names of the files training writes.

A run folder may come from anyone. Its weights are safetensors (no code), and its metadata is
JSON checked here before any of it sizes a network, names a cache folder or indexes an array.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from medlandmark.io.files import atomic_write_text
from medlandmark.records.plan import (
    Configuration,
    Plan,
    TrainingSettings,
    _Record,
    plain_name,
    positive_finite,
    read_record_file,
)

RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint_latest.pt"
BEST_WEIGHTS = "model_best.safetensors"
FINAL_WEIGHTS = "model_final.safetensors"
WEIGHT_FILES = {"best": BEST_WEIGHTS, "final": FINAL_WEIGHTS}
LOG_FILE = "log.csv"
TRAINING_CURVE_FILE = "training_curve.png"
ONNX_FILE = "model.onnx"
PREDICTION_SUMMARY_FILE = "summary.csv"  # written by predict beside the landmark files
RunStatus = Literal["training", "interrupted", "stopped", "finished"]


class RunSettings(TrainingSettings):
    """The training settings a run used: the plan's, with a recipe's and the command line's
    changes. The fields below the batch size exist for the papers' recipes
    (:mod:`medlandmark.training.recipes`); their defaults are medlandmark's own training."""

    learning_rate: float = Field(gt=0, allow_inf_nan=False)
    batch_size: int = Field(ge=1)
    recipe: str | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_share: float | None = Field(None, ge=0, lt=1)  # of the run, instead of warmup_epochs
    target: Literal["gaussian", "radius_bump"] = "gaussian"
    heatmap_sigma_voxels: float | None = Field(None, gt=0, allow_inf_nan=False)  # not the plan's
    deep_supervision: bool = True  # False: only the full-resolution output is trained
    prediction: Literal["full_resolution", "mean_of_heads"] = "full_resolution"

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"must be two numbers in [0, 1), got {list(betas)}")
        return betas


class BestValidation(_Record):
    """The validation that chose ``model_best``: its MRE, SDR and per-axis error spread."""

    val_mre_mm: float
    val_sdr: dict[str, float]
    step: int
    error_sd_voxels: list[float] | None = None


class ShapeModelRecord(_Record):
    """The training landmarks' constellation (:class:`medlandmark.shape_model.ShapeModel`)."""

    reference_mm: list[list[float] | None] = Field(min_length=1)
    inlier_mm: float = Field(gt=0, allow_inf_nan=False)
    singular_values: tuple[float, float]
    handedness: Literal[-1, 0, 1] = 0  # the training cases' (0: mixed, or a run from before)
    rotation_limit_deg: float | None = Field(default=None, ge=0, le=180)  # None: a run from before
    typical_orientation: list[list[float]] | None = None  # orthogonal (D, D); None: from before

    @model_validator(mode="after")
    def _consistent(self) -> ShapeModelRecord:
        rows = [r for r in self.reference_mm if r is not None]
        if not rows or len({len(r) for r in rows}) != 1 or len(rows[0]) not in (2, 3):
            raise ValueError(
                "reference_mm must hold 2D or 3D points (null for a landmark never seen)"
            )
        if not all(math.isfinite(v) for r in rows for v in r):
            raise ValueError("reference_mm must be finite")
        low, high = self.singular_values
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ValueError(f"singular_values must be 0 < low <= high, got {[low, high]}")
        if self.typical_orientation is not None:
            matrix = np.asarray(self.typical_orientation, dtype=np.float64)
            ndim = len(rows[0])
            if matrix.shape != (ndim, ndim) or not np.allclose(
                matrix @ matrix.T, np.eye(ndim), atol=1e-6
            ):
                raise ValueError(f"typical_orientation must be an orthogonal {ndim}x{ndim} matrix")
        return self

    @property
    def spatial_dims(self) -> int:
        return len(next(r for r in self.reference_mm if r is not None))


class VerdictThresholds(_Record):
    """The case checks of :mod:`medlandmark.verdict`, calibrated on ``cases`` validation cases:
    typical values and the limits beyond which a prediction is doubtful or failed."""

    cases: int = Field(ge=1)
    confidence_typical: float = Field(allow_inf_nan=False)
    confidence_doubtful: float = Field(allow_inf_nan=False)
    confidence_failed: float = Field(allow_inf_nan=False)
    shape_rms_typical_mm: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    shape_rms_doubtful_mm: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    disagreeing_share_doubtful: float = Field(ge=0, le=1)
    missing_share_doubtful: float = Field(ge=0, le=1)
    missing_share_failed: float = Field(ge=0, le=1)


class RunRecord(_Record):
    """``run.json``: the network, its plan, its landmarks and what training learnt and measured."""

    _omit_when_none: ClassVar[tuple[str, ...]] = (
        "train_seconds",
        "best",
        "weight_checksum_per_rank",
        "shape_model",
        "presence_threshold",
        "relative_presence_threshold",
        "error_bounds_mm",
        "error_bound_level",
        "verdict_thresholds",
    )
    version: Literal[1] = 1
    status: RunStatus = "training"
    dataset: str = ""
    dataset_path: str | None = None
    arch: str
    configuration: str
    fold: int | Literal["all"] = 0
    plan: Plan
    landmarks: list[str] = Field(min_length=1)
    symmetric_pairs: list[tuple[str, str]] = []
    spacing_mm: list[float] | None = None
    train_cases: list[str] = []
    val_cases: list[str] = []
    settings: RunSettings | None = None
    options: dict[str, Any] = {}
    step: int = 0
    train_seconds: float | None = None  # training time so far (steps, validations, checkpoints)
    best: BestValidation | None = None
    presence_threshold: float | None = Field(default=None, allow_inf_nan=False)  # a confidence
    # the same on confidences over their case's reference (heatmaps.relative_confidences)
    relative_presence_threshold: float | None = Field(default=None, allow_inf_nan=False)
    # per landmark, the radius (mm) a predicted point's error stays within with probability
    # error_bound_level, by split conformal prediction on the validation errors
    error_bounds_mm: list[float] | None = None
    error_bound_level: float | None = Field(default=None, gt=0, lt=1)
    shape_model: ShapeModelRecord | None = None
    verdict_thresholds: VerdictThresholds | None = None  # from the best validation's cases
    weight_checksum_per_rank: list[float] | None = None

    _arch = field_validator("arch")(plain_name)

    @model_validator(mode="after")
    def _consistent(self) -> RunRecord:
        if self.configuration not in self.plan.configurations:
            raise ValueError(f"configuration '{self.configuration}' is not in its plan")
        if len(set(self.landmarks)) != len(self.landmarks):
            raise ValueError("landmark names repeat")
        unknown = {n for pair in self.symmetric_pairs for n in pair} - set(self.landmarks)
        if unknown:
            raise ValueError(
                f"symmetric_pairs name unknown landmarks: {', '.join(sorted(unknown))}"
            )
        if self.spacing_mm is not None:
            positive_finite(self.spacing_mm)
        bounds = self.error_bounds_mm
        if bounds is not None and (
            len(bounds) != len(self.landmarks)
            or not all(math.isfinite(b) and b >= 0 for b in bounds)
        ):
            raise ValueError("error_bounds_mm must hold one finite radius >= 0 per landmark")
        shape = self.shape_model
        if shape is not None and (
            len(shape.reference_mm) != len(self.landmarks)
            or shape.spatial_dims != self.plan.spatial_dims
        ):
            raise ValueError("shape_model does not match the landmarks or the plan's dimensions")
        return self

    @property
    def plan_configuration(self) -> Configuration:
        """The configuration this run trained."""
        return self.plan.configurations[self.configuration]

    def to_json(self) -> str:
        """The record as ``run.json`` text."""
        return json.dumps(self.model_dump(mode="json"), indent=1) + "\n"


def read_run_record(folder: str | Path) -> RunRecord:
    """``folder/run.json``, checked against :class:`RunRecord`."""
    path = Path(folder) / RUN_FILE
    return read_record_file(path, RunRecord, "run", "no run.json: not a trained run")


def write_run_record(folder: str | Path, record: RunRecord) -> None:
    """``folder/run.json``, atomically."""
    atomic_write_text(Path(folder) / RUN_FILE, record.to_json())
