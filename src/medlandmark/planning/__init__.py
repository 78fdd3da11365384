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
from medlandmark.records.model_card import run_or_model_folder
from medlandmark.records.plan import PLANS_FILE, Plan, load_plan, write_plan
from medlandmark.records.run import RUN_FILE, read_run_record

FINGERPRINT_FILE = "fingerprint.json"

__all__ = [
    "PLANS_FILE",
    "load_plan",
    "make_plan",
    "plan_dataset",
    "plan_like",
    "transferred_plan",
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


def plan_like(
    dataset_root: str | Path, source: str, preprocessed: str | Path | None = None
) -> Plan:
    """Write ``plans.json`` for a dataset from a trained run's plan (nnU-Net's plan transfer),
    so that ``train --init-from SOURCE`` finds networks of the same sizes. ``source`` is a run
    folder, a folder of runs or a shipped model's name."""
    source_plan = trained_plan(source)
    plan = transferred_plan(dataset_root, source_plan, preprocessed, f"--plans-from {source}")
    shared = len(set(plan.landmarks) & set(source_plan.landmarks))
    info(plan_summary(plan))
    info(
        f"wrote the plan of {source} for {dataset_root} ({shared} of the dataset's "
        f"{len(plan.landmarks)} landmarks are among its {len(source_plan.landmarks)})"
    )
    return plan


def transferred_plan(
    dataset_root: str | Path,
    source_plan: Plan,
    preprocessed: str | Path | None = None,
    source_name: str = "the source plan",
) -> Plan:
    """``source_plan`` written for another dataset: the same spacing, normalisation, patches
    and networks, the dataset's own name, landmarks and channels."""
    dataset, root = Dataset(dataset_root), Path(dataset_root)
    spec = dataset.spec
    if spec.spatial_dims != source_plan.spatial_dims:
        raise MedlandmarkError(
            f"{source_name}: a {source_plan.spatial_dims}D plan cannot serve a "
            f"{spec.spatial_dims}D dataset",
            root,
        )
    if len(spec.modalities) != len(source_plan.modalities):
        raise MedlandmarkError(
            f"{source_name}: the plan reads {len(source_plan.modalities)} channel(s) "
            f"({', '.join(source_plan.modalities)}), the dataset has {len(spec.modalities)}",
            root,
        )
    plan = source_plan.model_copy(
        update={
            "dataset": spec.name,
            "landmarks": list(spec.landmarks),
            "modalities": list(spec.modalities),
            "fingerprint_signature": None,
            "dataset_path": str(root.resolve()),
        }
    )
    write_plan(preprocessed_folder(dataset_root, preprocessed), plan)
    return plan


def trained_plan(source: str) -> Plan:
    """The plan a run folder, a folder of runs or a shipped model (by name) was trained with."""
    path = run_or_model_folder(source)
    if (path / RUN_FILE).is_file():
        return read_run_record(path).plan
    runs = sorted(path.glob(f"*/{RUN_FILE}"))
    if not runs:
        raise MedlandmarkError("no run.json here or in its sub-folders: not a trained run", path)
    return read_run_record(runs[0].parent).plan


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
