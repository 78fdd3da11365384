"""Models shipped inside the package, found by name, and their cards.

Each lives in ``medlandmark/shipped_models/<name>/``: ``model.json`` (:class:`ModelCard`: what
it finds, on which images, how well, measured with the command that measured it, and under which
terms its training data may be used), ``MODEL_CARD.md`` (the same in prose) and
``runs/<configuration>/`` (``run.json`` and ``model_best.safetensors``), a folder of runs that
``predict``, ``train --init-from`` and ``Predictor.from_run`` take like any other. Nothing is
fetched from a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator

from medlandmark.errors import MedlandmarkError
from medlandmark.records.plan import _Record, plain_name, positive_finite, read_record_file

SHIPPED_FOLDER = Path(__file__).resolve().parents[1] / "shipped_models"
MODEL_CARD_FILE = "model.json"
MODEL_CARD_TEXT = "MODEL_CARD.md"
RUNS_FOLDER = "runs"


class Measurement(_Record):
    """One evaluation of the shipped weights: a split, its figures and how they were made."""

    split: str
    n_cases: int = Field(ge=1)
    n_points: int = Field(ge=0)
    mre_mm: float = Field(ge=0, allow_inf_nan=False)
    sd_mm: float = Field(ge=0, allow_inf_nan=False)
    sdr_percent: dict[str, float]  # radius in mm as a string ("2.0") -> percent within it
    missing_precision: float | None = None
    missing_recall: float | None = None
    error_bound_coverage_percent: float | None = None
    per_case_mre_mm: dict[str, float] = {}  # case id -> MRE: a few cases reproduce it quickly
    command: str
    machine: str
    date: str


class ModelCard(_Record):
    """``model.json``: a shipped model's name, what it finds and on which images, its measured
    accuracy and the terms of its training data."""

    version: int = 1
    name: str
    title: str
    dimensions: int = Field(ge=2, le=3)
    landmarks: list[str] = Field(min_length=1)
    spacing_mm: list[float] | None = None  # for images whose files carry none (JPEG, PNG)
    input_conventions: str  # modality, orientation, field of view the model expects
    training_data: str
    data_terms: str  # the licence or terms of use of the training data
    intended_use: str
    limits: str
    weights_dtype: str = "float16"
    fp32_mre_mm: float | None = None  # the same split before the weights were halved
    measured: list[Measurement] = Field(min_length=1)

    _name = field_validator("name")(plain_name)
    _spacing = field_validator("spacing_mm")(
        lambda values: None if values is None else positive_finite(values)
    )


def read_model_card(folder: str | Path) -> ModelCard:
    """``folder/model.json``, checked against :class:`ModelCard`."""
    path = Path(folder) / MODEL_CARD_FILE
    return read_record_file(path, ModelCard, "model card", "no model.json: not a shipped model")


@dataclass(frozen=True)
class ShippedModel:
    """A model in the package: its folder, its card and its runs."""

    name: str
    folder: Path
    card: ModelCard

    @property
    def runs(self) -> Path:
        """The folder of runs to predict with."""
        return self.folder / RUNS_FOLDER

    @property
    def card_text(self) -> str:
        path = self.folder / MODEL_CARD_TEXT
        return path.read_text(encoding="utf-8") if path.is_file() else ""

    @property
    def size_mb(self) -> float:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file()) / 1e6


def shipped_models(folder: Path = SHIPPED_FOLDER) -> list[ShippedModel]:
    """Every shipped model, by name."""
    if not folder.is_dir():
        return []
    found = sorted(p.parent for p in folder.glob(f"*/{MODEL_CARD_FILE}"))
    return [ShippedModel(p.name, p, read_model_card(p)) for p in found]


def shipped_model(name: str, folder: Path = SHIPPED_FOLDER) -> ShippedModel:
    """The shipped model called ``name``; an error listing the shipped ones otherwise."""
    models = {m.name: m for m in shipped_models(folder)}
    if name not in models:
        known = ", ".join(models) or "none"
        raise MedlandmarkError(
            f"no shipped model called '{name}' (shipped: {known}; 'medlandmark models list' "
            "describes them); give a run folder instead to predict with your own"
        )
    return models[name]


def run_or_model_folder(source: str) -> Path:
    """``source`` as a folder: a run folder or folder of runs as given, else the runs of the
    shipped model it names; an error naming both readings when it is neither."""
    path = Path(source)
    if path.exists():
        return path
    try:
        return shipped_model(source).runs
    except MedlandmarkError as error:
        raise MedlandmarkError(
            f"{source}: neither a run folder nor a shipped model ({error})"
        ) from None
