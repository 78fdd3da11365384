"""Predict a batch of images into landmark files: an image that fails is reported, the others
still complete, and no half-written file is ever left."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlandmark.console import info, progress, warn
from medlandmark.errors import MedlandmarkError
from medlandmark.inference.predictor import Predictor
from medlandmark.io.files import atomic_write_text, full_suffix, stem
from medlandmark.io.images import IMAGE_SUFFIXES, read_image
from medlandmark.io.landmarks import SUFFIX_BY_FORMAT, write_landmarks
from medlandmark.records.run import PREDICTION_SUMMARY_FILE as SUMMARY_FILE

SUMMARY_COLUMNS = [
    "case_id",
    "status",
    "landmark_file",
    "present",
    "missing",
    "mean_confidence",
    "verdict",
    "verdict_reasons",
    "orientation",
    "seconds",
    "message",
]
OUTPUT_FORMATS = ("csv", "json", "mrk.json", "fcsv")


def collect_inputs(inputs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """``(case_id, path)`` for each image: files as given, the images of a folder (or of its
    ``images/`` sub-folder, for a dataset), a folder of DICOM files as one series."""
    cases = []
    for given in map(Path, inputs):
        if given.is_dir() and (given / "images").is_dir():
            given = given / "images"
        if given.is_dir():
            entries = sorted(p for p in given.iterdir() if not p.name.startswith("."))
            images = [
                p
                for p in entries
                if p.is_file() and full_suffix(p) in IMAGE_SUFFIXES and full_suffix(p) != ".dcm"
            ]
            series = [p for p in entries if p.is_dir()]
            if images or series:
                cases += [(stem(p), p) for p in images] + [(p.name, p) for p in series]
            elif any(full_suffix(p) == ".dcm" for p in entries):
                cases.append((given.name, given))
            else:
                raise MedlandmarkError("folder holds no images", given)
        else:
            cases.append((stem(given), given))
    ids = [case_id for case_id, _ in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise MedlandmarkError(
            f"several inputs share the case id(s) {', '.join(duplicates)}: outputs would collide"
        )
    return cases


@dataclass
class PredictOptions:
    """How to predict: the landmark file format, the device, test-time mirroring, overlays, a
    pixel spacing for images that store none, which weights, ONNX Runtime instead of PyTorch
    (``onnx``), and the shape check (see :class:`~medlandmark.inference.predictor.Predictor`)."""

    output_format: str = "json"
    device: str = "auto"
    tta: bool = False
    overlay: bool = False
    spacing_xy_mm: Sequence[float] | None = None
    weights: str = "best"
    onnx: str | Path | None = None
    shape_check: bool = True
    orientation: str = "auto"
    presence: str = "auto"
    window_orientation: str = "auto"


def predict_files(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    options: PredictOptions | None = None,
) -> list[dict]:
    """Predict every input into ``out/<case_id>.<format>`` and ``out/summary.csv``; returns the
    summary rows (``status``: whether the image was predicted, ``ok`` or ``failed`` with the
    reason; ``verdict``: how far its landmarks can be trusted, ``ok``, ``doubtful`` or
    ``failed``, with the reasons). One line is printed per doubtful or failed case."""
    options = options or PredictOptions()
    if options.output_format not in OUTPUT_FORMATS:
        raise MedlandmarkError(
            f"unknown output format '{options.output_format}' (use {', '.join(OUTPUT_FORMATS)})"
        )
    out = Path(out)
    cases = collect_inputs(inputs)
    predictor = Predictor.from_run(
        model_dir,
        device=options.device,
        weights=options.weights,
        tta=options.tta,
        onnx=options.onnx,
        shape_check=options.shape_check,
        orientation=options.orientation,
        presence=options.presence,
        window_orientation=options.window_orientation,
    )
    spacing = options.spacing_xy_mm or predictor.stages[0].spacing_mm
    rows = []
    for case_id, path in progress(cases, description="predicting"):
        started = time.perf_counter()
        try:
            image = read_image(path, spacing_xy_mm=spacing)  # used only by formats that store none
            prediction = predictor.predict(image, name=str(path))
            target = out / f"{case_id}{SUFFIX_BY_FORMAT[options.output_format]}"
            write_landmarks(target, prediction.landmarks)
            if options.overlay:
                _write_overlay(out / "overlays" / f"{case_id}.png", image, prediction)
            rows.append(_summary_row(case_id, target, prediction, started))
            _say_what_was_found(case_id, prediction)
        except MedlandmarkError as error:
            message = str(error) if error.path is not None else f"{path}: {error}"
            warn(message)
            rows.append(_failure_row(case_id, message, started))
    _write_summary(out / SUMMARY_FILE, rows)
    failed = sum(r["status"] == "failed" for r in rows)
    failures = f"; {failed} failed (see {SUMMARY_FILE})" if failed else ""
    info(f"predicted {len(rows) - failed} of {len(rows)} images into {out}{failures}")
    _count_verdicts(rows, len(rows) - failed)
    return rows


def _say_what_was_found(case_id: str, prediction) -> None:
    """One line for a doubtful or failed case, and one for an image found re-oriented."""
    verdict = prediction.verdict
    if verdict is not None and verdict.status != "ok":
        warn(f"{case_id}: {verdict.text}")
    if prediction.orientation != "as given":
        info(f"{case_id}: predicted {prediction.orientation} (that fits the training shape)")


def _count_verdicts(rows: list[dict], predicted: int) -> None:
    doubted = {v: sum(r["verdict"] == v for r in rows) for v in ("doubtful", "failed")}
    if any(doubted.values()):
        info(
            f"verdicts: {doubted['doubtful']} doubtful, {doubted['failed']} failed of "
            f"{predicted} predicted (reasons in {SUMMARY_FILE} and each landmark file)"
        )


def _summary_row(case_id: str, target: Path, prediction, started: float) -> dict:
    present = prediction.present
    return {
        "case_id": case_id,
        "status": "ok",
        "landmark_file": target.name,
        "present": int(present.sum()),
        "missing": int((~present).sum()),
        "mean_confidence": round(float(np.mean(prediction.peak)), 4),
        "verdict": "" if prediction.verdict is None else prediction.verdict.status,
        "verdict_reasons": ""
        if prediction.verdict is None
        else "; ".join(prediction.verdict.reasons),
        "orientation": prediction.orientation,
        "seconds": round(time.perf_counter() - started, 3),
        "message": "",
    }


def _failure_row(case_id: str, message: str, started: float) -> dict:
    row = dict.fromkeys(SUMMARY_COLUMNS, "")
    seconds = round(time.perf_counter() - started, 3)
    return {**row, "case_id": case_id, "status": "failed", "seconds": seconds, "message": message}


def _write_overlay(path: Path, image, prediction) -> None:
    from medlandmark import overlays

    draw = overlays.overlay_2d if image.ndim == 2 else overlays.overlay_3d
    draw(image, prediction.landmarks, path)


def _write_summary(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
