"""``plans.json`` as typed objects: :class:`Plan`, its :class:`Configuration` s and training defaults.

A plan is written by ``medlandmark plan`` and may be edited by hand; :func:`load_plan` validates
it against these models before any of it sizes a network, names a cache folder or indexes an
array. :meth:`Plan.to_json` writes exactly the keys that were read or planned.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from medlandmark.datasets.dataset import valid_case_id
from medlandmark.errors import MedlandmarkError, validation_problems
from medlandmark.io.files import atomic_write_text

PLANS_FILE = "plans.json"
PLANS_VERSION = 1
Stage = Literal["full", "coarse", "fine"]
RecordT = TypeVar("RecordT", bound=BaseModel)


def plain_name(name: str) -> str:
    """Configuration, cache-folder and architecture names: never a path (as case ids)."""
    if not valid_case_id(name):
        raise ValueError(
            f"must be a plain name (letters, digits, '.', '_', '-', no '..'), got {name!r}"
        )
    return name


def positive_finite(values: list[float]) -> list[float]:
    """``values`` when each is a positive finite number (a spacing, a size in mm)."""
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"must hold positive finite numbers, got {values}")
    return values


class _Record(BaseModel):
    """A part of a pipeline file: unknown keys are typos, and ``None`` optionals are not written."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _omit_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_absent(self, handler):
        data = handler(self)
        for name in self._omit_when_none:
            if data.get(name, 0) is None:
                del data[name]
        return data


class Topology(_Record):
    """The U-Net-style topology a configuration's patch allows (nnU-Net's pooling rules)."""

    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    pools_per_axis: list[int]
    features_per_stage: list[int]


class Normalization(_Record):
    """How one input channel is normalised: CT's global clip and z-score, or per image."""

    _omit_when_none: ClassVar[tuple[str, ...]] = ("clip", "mean", "std")
    scheme: Literal["ct", "zscore_per_image"]
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ct_has_statistics(self) -> Normalization:
        if self.scheme == "ct" and None in (self.clip, self.mean, self.std):
            raise ValueError("the ct scheme needs clip, mean and std")
        return self


class Configuration(_Record):
    """One way to train: a spacing, a patch, a batch, a heatmap sigma and network sizes."""

    _omit_when_none: ClassVar[tuple[str, ...]] = (
        "next_stage",
        "previous_stage",
        "downsampling_factor",
    )
    name: str
    stage: Stage
    data_identifier: str
    spacing_mm: list[float]
    patch_size: list[int]
    batch_size: int = Field(ge=1, le=4096)
    heatmap_sigma_mm: float = Field(gt=0, allow_inf_nan=False)
    heatmap_sigma_voxels: list[float]
    estimated_gpu_memory_gb: float = 0.0
    topology: Topology | None = None
    architectures: dict[str, dict[str, Any]]
    next_stage: str | None = None
    previous_stage: str | None = None
    downsampling_factor: float | None = None

    _names = field_validator("name", "data_identifier")(plain_name)
    _spacing = field_validator("spacing_mm", "heatmap_sigma_voxels")(positive_finite)

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, patch: list[int]) -> list[int]:
        if not all(1 <= p <= 4096 for p in patch):
            raise ValueError(f"must hold sizes from 1 to 4096 voxels, got {patch}")
        return patch

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)


class TrainingSettings(_Record):
    """How to train, unless the command line says otherwise (the plan's ``training``)."""

    epochs: int = Field(ge=1)
    iterations_per_epoch: int = Field(ge=1)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    schedule: Literal["cosine", "poly", "exponential"] = "cosine"
    learning_rate: float | dict[str, float]
    weight_decay: float = Field(0.01, ge=0)
    sgd_momentum: float = Field(0.99, ge=0, lt=1)
    warmup_epochs: int = Field(0, ge=0)
    grad_clip: float = Field(12.0, gt=0)
    landmark_fraction: float = Field(0.33, ge=0, le=1)
    validate_every: int = Field(10, ge=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    loss: str = "balanced_mse"
    missing_target: Literal["mask", "zero"] = "mask"
    folds: int = Field(5, ge=2)

    def learning_rate_for(self, arch: str) -> float:
        """The learning rate of ``arch`` (the plan may give one per architecture)."""
        if isinstance(self.learning_rate, float):
            return self.learning_rate
        if arch not in self.learning_rate:
            raise ValueError(f"the plan's training.learning_rate has no value for '{arch}'")
        return self.learning_rate[arch]


class Plan(_Record):
    """``plans.json``: the decisions of self-configuration for one dataset."""

    _omit_when_none: ClassVar[tuple[str, ...]] = (
        "dataset_path",
        "fingerprint_signature",
        "width_multiplier",
    )
    version: Literal[1] = PLANS_VERSION
    dataset: str
    spatial_dims: Literal[2, 3]
    landmarks: list[str] = Field(min_length=1)
    modalities: list[str] = Field(min_length=1)
    gpu_memory_gb: float = Field(8.0, gt=0)
    base_features: int = Field(32, ge=1)
    target_spacing_overridden: bool = False
    width_multiplier: float | None = Field(None, gt=0)  # given by hand (plan --width)
    reorient: bool = False  # plans written before reorientation existed keep their behaviour
    fingerprint_signature: str | None = None
    dataset_path: str | None = None
    transpose_forward: list[int]
    transpose_backward: list[int]
    target_spacing_mm: list[float]
    median_shape_at_target: list[float]
    normalization: list[Normalization]
    default_configuration: str
    configurations: dict[str, Configuration] = Field(min_length=1)
    training: TrainingSettings

    _spacing = field_validator("target_spacing_mm")(positive_finite)

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        ndim = self.spatial_dims
        for axes in (self.transpose_forward, self.transpose_backward):
            if sorted(axes) != list(range(ndim)):
                raise ValueError(f"transpose {axes} is not a permutation of {ndim} axes")
        if len(self.normalization) != len(self.modalities):
            raise ValueError("normalization needs one entry per modality")
        for name, config in self.configurations.items():
            if config.name != name:
                raise ValueError(f"configuration '{name}' is named '{config.name}'")
            if config.spatial_dims != ndim or len(config.spacing_mm) != ndim:
                raise ValueError(f"configuration '{name}' is not {ndim}D")
            for linked in (config.next_stage, config.previous_stage):
                if linked is not None and linked not in self.configurations:
                    raise ValueError(f"configuration '{name}' links to unknown '{linked}'")
        if self.default_configuration not in self.configurations:
            raise ValueError(f"default_configuration '{self.default_configuration}' is not planned")
        return self

    def configuration(self, name: str | None = None) -> Configuration:
        """The configuration ``name`` (the default one for None); a KeyError naming the others."""
        name = name or self.default_configuration
        if name not in self.configurations:
            raise KeyError(
                f"no configuration '{name}' in the plan (it has {', '.join(self.configurations)})"
            )
        return self.configurations[name]

    def to_json(self) -> str:
        """The plan as ``plans.json`` text."""
        return json.dumps(self.model_dump(mode="json"), indent=1) + "\n"


def validated_record(kind: type[RecordT], data: object, path: str | Path, schema: str) -> RecordT:
    """``data`` (a parsed JSON file at ``path``) checked against ``kind``; a MedlandmarkError
    naming the file and its first problems otherwise."""
    name = Path(path).name
    if not isinstance(data, dict):
        raise MedlandmarkError(f"invalid {name} (not a JSON object)", path)
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        problems = validation_problems(error, name, limit=5)
        raise MedlandmarkError(
            f"{name} does not match the {schema} schema: {problems}", path
        ) from None


def read_record_file(path: Path, kind: type[RecordT], schema: str, missing: str) -> RecordT:
    """The JSON file at ``path`` checked against ``kind``; a MedlandmarkError naming the file:
    ``missing`` when it does not exist, otherwise what is wrong with its JSON or its fields."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedlandmarkError(missing, path) from None
    except (UnicodeDecodeError, ValueError) as error:
        raise MedlandmarkError(f"invalid {path.name} ({error})", path) from None
    return validated_record(kind, data, path, schema)


def parse_plan(data: object, path: str | Path) -> Plan:
    """``data`` (a parsed ``plans.json``) checked against :class:`Plan`."""
    if isinstance(data, dict) and data.get("version") != PLANS_VERSION:
        raise MedlandmarkError(
            f"plans.json version {data.get('version')!r} is not {PLANS_VERSION}; re-run plan", path
        )
    return validated_record(Plan, data, path, "plan")


def load_plan(folder: str | Path) -> Plan:
    """``plans.json`` of a preprocessed folder, validated."""
    path = Path(folder) / PLANS_FILE
    if not path.is_file():
        raise MedlandmarkError("no plans.json: run 'medlandmark plan DATASET' first", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MedlandmarkError(f"invalid JSON ({error})", path) from None
    return parse_plan(data, path)


def write_plan(folder: str | Path, plan: Plan) -> Path:
    """Write ``plans.json`` into ``folder`` atomically; its path."""
    path = Path(folder) / PLANS_FILE
    atomic_write_text(path, plan.to_json())
    return path
