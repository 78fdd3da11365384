"""Self-configuration: dataset fingerprint -> plans.json (spacing, patches, networks, cascade)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from medlandmark.console import info
from medlandmark.datasets.dataset import Dataset
from medlandmark.errors import MedlandmarkError
from medlandmark.planning.fingerprint import (
    FINGERPRINT_VERSION,
    compute_fingerprint,
    dataset_signature,
    write_fingerprint,
)
from medlandmark.planning.planner import BASE_FEATURES, make_plan, plan_summary
from medlandmark.records.plan import PLANS_FILE, Plan, load_plan, write_plan

FINGERPRINT_FILE = "fingerprint.json"

__all__ = [
    "PLANS_FILE",
    "load_plan",
    "make_plan",
    "plan_dataset",
    "plan_summary",
    "preprocessed_folder",
]


def preprocessed_folder(dataset_root: str | Path, preprocessed: str | Path | None = None) -> Path:
    """Where fingerprint, plans and caches live: ``--preprocessed`` or ``DATASET/preprocessed``."""
    return Path(preprocessed) if preprocessed is not None else Path(dataset_root) / "preprocessed"


def plan_dataset(
    dataset_root: str | Path,
    preprocessed: str | Path | None = None,
    gpu_memory_gb: float = 8.0,
    workers: int = 4,
    base_features: int = BASE_FEATURES,
    spacing_override_mm: Sequence[float] | None = None,
    width_multiplier: float | None = None,
) -> Plan:
    """Fingerprint the dataset (reusing an up-to-date ``fingerprint.json``), plan, write
    ``plans.json`` and print the plan's summary (``spacing_override_mm`` and
    ``width_multiplier``: see ``make_plan``)."""
    dataset = Dataset(dataset_root)
    folder = preprocessed_folder(dataset_root, preprocessed)
    fingerprint = _cached_fingerprint(folder / FINGERPRINT_FILE, dataset)
    if fingerprint is None:
        fingerprint = compute_fingerprint(dataset, workers=workers)
        write_fingerprint(folder / FINGERPRINT_FILE, fingerprint)
    missing = fingerprint["landmark_statistics"]["fraction_missing"]
    if missing and min(missing.values()) >= 1.0:
        raise MedlandmarkError(
            "no training case has any landmark present: there is nothing to learn from "
            "(are the landmark files empty, or every point marked missing?)",
            Path(dataset_root) / "landmarks",
        )
    info("planning spacings, patches, batches and network sizes...")
    try:
        plan = make_plan(
            fingerprint, gpu_memory_gb, base_features, spacing_override_mm, width_multiplier
        )
    except ValueError as error:
        raise MedlandmarkError(str(error), dataset_root) from None
    plan.dataset_path = str(Path(dataset_root).resolve())
    path = write_plan(folder, plan)
    info(plan_summary(plan))
    info(f"wrote {path}")
    return plan


def _cached_fingerprint(path: Path, dataset: Dataset) -> dict | None:
    if not path.is_file():
        return None
    try:
        fingerprint = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if fingerprint.get("version") != FINGERPRINT_VERSION:
        return None
    case_ids = fingerprint.get("case_ids", [])
    try:
        if case_ids != dataset.splits().get("train", dataset.case_ids):  # a case added or removed
            return None
        current = dataset_signature(dataset, case_ids)
    except MedlandmarkError:
        return None
    return fingerprint if fingerprint.get("input_signature") == current else None
