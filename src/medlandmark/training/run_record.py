"""The schema of a run folder's ``run.json``: what prediction and export trust from it.

A run folder may come from anyone. Its weights are safetensors (no code), and its metadata is
JSON checked here before any of it sizes a network, names a cache folder or indexes an array.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medlandmark.datasets.dataset import valid_case_id
from medlandmark.errors import MedlandmarkError, validation_problems

RUN_FILE = "run.json"


def _plain_name(name: str) -> str:
    """Configuration, cache-folder and architecture names: never a path (as case ids)."""
    if not valid_case_id(name):
        raise ValueError(f"must be a plain name (letters, digits, '.', '_', '-', no '..'), got {name!r}")
    return name


def _positive_finite(values: list[float]) -> list[float]:
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"must hold positive finite numbers, got {values}")
    return values


class ConfigurationRecord(BaseModel):
    """One plan configuration, as far as inference uses it."""

    model_config = ConfigDict(extra="allow")
    name: str
    stage: Literal["full", "coarse", "fine"]
    data_identifier: str
    spacing_mm: list[float]
    patch_size: list[int]
    batch_size: int = Field(ge=1, le=4096)
    heatmap_sigma_mm: float = Field(gt=0, allow_inf_nan=False)
    architectures: dict[str, dict]
    next_stage: str | None = None
    previous_stage: str | None = None

    _names = field_validator("name", "data_identifier")(_plain_name)
    _spacing = field_validator("spacing_mm")(_positive_finite)

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, patch: list[int]) -> list[int]:
        if not all(1 <= p <= 4096 for p in patch):
            raise ValueError(f"must hold sizes from 1 to 4096 voxels, got {patch}")
        return patch


class PlanRecord(BaseModel):
    """The plan copied into the run."""

    model_config = ConfigDict(extra="allow")
    spatial_dims: Literal[2, 3]
    modalities: list[str] = Field(min_length=1)
    transpose_forward: list[int]
    normalization: list[dict]
    configurations: dict[str, ConfigurationRecord] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> PlanRecord:
        ndim = self.spatial_dims
        if sorted(self.transpose_forward) != list(range(ndim)):
            raise ValueError(f"transpose_forward {self.transpose_forward} is not a permutation of {ndim} axes")
        if len(self.normalization) != len(self.modalities):
            raise ValueError("normalization needs one entry per modality")
        for name, config in self.configurations.items():
            if len(config.patch_size) != ndim or len(config.spacing_mm) != ndim:
                raise ValueError(f"configuration '{name}' is not {ndim}D")
        return self


class ShapeModelRecord(BaseModel):
    """The training landmarks' constellation (:class:`medlandmark.shape_model.ShapeModel`)."""

    model_config = ConfigDict(extra="forbid")
    reference_mm: list[list[float] | None] = Field(min_length=1)
    inlier_mm: float = Field(gt=0, allow_inf_nan=False)
    singular_values: tuple[float, float]

    @model_validator(mode="after")
    def _consistent(self) -> ShapeModelRecord:
        rows = [r for r in self.reference_mm if r is not None]
        if not rows or len({len(r) for r in rows}) != 1 or len(rows[0]) not in (2, 3):
            raise ValueError("reference_mm must hold 2D or 3D points (null for a landmark never seen)")
        if not all(math.isfinite(v) for r in rows for v in r):
            raise ValueError("reference_mm must be finite")
        low, high = self.singular_values
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ValueError(f"singular_values must be 0 < low <= high, got {[low, high]}")
        return self


class RunRecord(BaseModel):
    """``run.json``: the network, its plan, its landmarks and the calibrated threshold."""

    model_config = ConfigDict(extra="allow")
    arch: str
    configuration: str
    plan: PlanRecord
    landmarks: list[str] = Field(min_length=1)
    symmetric_pairs: list[tuple[str, str]] = []
    spacing_mm: list[float] | None = None
    presence_threshold: float | None = Field(default=None, allow_inf_nan=False)  # a heatmap peak value
    shape_model: ShapeModelRecord | None = None

    _arch = field_validator("arch")(_plain_name)

    @model_validator(mode="after")
    def _consistent(self) -> RunRecord:
        if self.configuration not in self.plan.configurations:
            raise ValueError(f"configuration '{self.configuration}' is not in its plan")
        if len(set(self.landmarks)) != len(self.landmarks):
            raise ValueError("landmark names repeat")
        unknown = {n for pair in self.symmetric_pairs for n in pair} - set(self.landmarks)
        if unknown:
            raise ValueError(f"symmetric_pairs name unknown landmarks: {', '.join(sorted(unknown))}")
        if self.spacing_mm is not None:
            _positive_finite(self.spacing_mm)
        if self.shape_model is not None:
            rows = [r for r in self.shape_model.reference_mm if r is not None]
            if len(self.shape_model.reference_mm) != len(self.landmarks) or len(rows[0]) != self.plan.spatial_dims:
                raise ValueError("shape_model does not match the landmarks or the plan's dimensions")
        return self


def read_run_record(folder: str | Path) -> dict:
    """``folder/run.json`` checked against :class:`RunRecord`; the JSON as a dict."""
    path = Path(folder) / RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedlandmarkError("no run.json: not a trained run", path) from None
    except (UnicodeDecodeError, ValueError) as error:
        raise MedlandmarkError(f"invalid run.json ({error})", path) from None
    if not isinstance(record, dict):
        raise MedlandmarkError("invalid run.json (not a JSON object)", path)
    try:
        RunRecord.model_validate(record)
    except ValidationError as error:
        problems = validation_problems(error, "run.json", limit=5)
        raise MedlandmarkError(f"run.json does not match the run schema: {problems}", path) from None
    return record
