"""Making and showing the models shipped inside the package (found by name in
:mod:`medlandmark.records.model_card`): :func:`ship_runs` copies trained runs without this
machine's paths, in half precision; :func:`write_model_card` adds the card; the printers serve
``medlandmark models list`` and ``models show``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medlandmark.errors import MedlandmarkError
from medlandmark.io.files import atomic_path, atomic_write_text
from medlandmark.records.model_card import (
    MODEL_CARD_FILE,
    MODEL_CARD_TEXT,
    RUNS_FOLDER,
    ModelCard,
    ShippedModel,
)
from medlandmark.records.run import BEST_WEIGHTS, RUN_FILE, read_run_record, write_run_record

PATH_OPTIONS = ("preprocessed", "coarse_run")  # training options that name this machine's folders


def ship_runs(runs: Path, out: Path, half: bool = True) -> Path:
    """The runs of a shipped model folder ``out`` (replaced) from a folder of trained runs: each
    run's ``run.json`` without this machine's paths and its best weights, halved to float16 when
    ``half``. The folder is a shipped model once :func:`write_model_card` has added its card."""
    folders = sorted(p.parent for p in Path(runs).glob(f"*/{RUN_FILE}"))
    if not folders:
        raise MedlandmarkError("no trained run here (no sub-folders with run.json)", runs)
    if out.exists():
        shutil.rmtree(out)
    for folder in folders:
        record = read_run_record(folder)
        record.dataset_path = None
        record.plan.dataset_path = None
        record.options = {k: v for k, v in record.options.items() if k not in PATH_OPTIONS}
        target = out / RUNS_FOLDER / folder.name
        target.mkdir(parents=True)
        write_run_record(target, record)
        tensors = load_file(str(folder / BEST_WEIGHTS))
        if half:
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        with atomic_path(target / BEST_WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
    return out / RUNS_FOLDER


def write_model_card(folder: Path, card: ModelCard) -> ShippedModel:
    """``model.json`` and ``MODEL_CARD.md`` in a folder made by :func:`ship_runs`; the weights'
    type is read from the weights."""
    model = ShippedModel(card.name, folder, card)
    dtype = str(weights_dtype(model)).removeprefix("torch.")
    card = card.model_copy(update={"weights_dtype": dtype})
    atomic_write_text(folder / MODEL_CARD_FILE, card.model_dump_json(indent=1) + "\n")
    atomic_write_text(folder / MODEL_CARD_TEXT, card_markdown(card))
    return ShippedModel(card.name, folder, card)


def card_markdown(card: ModelCard) -> str:
    """The model card as Markdown (``MODEL_CARD.md``), written from ``model.json``."""
    lines = [
        f"# {card.name}: {card.title}",
        "",
        f"{card.dimensions}D, {len(card.landmarks)} landmarks: {', '.join(card.landmarks)}.",
        "",
        f"**Input.** {card.input_conventions}",
    ]
    if card.spacing_mm:
        spacing = " x ".join(f"{v:g}" for v in card.spacing_mm)
        lines.append(f"Images whose files carry no spacing (JPEG, PNG) are taken at {spacing} mm.")
    lines += [
        "",
        f"**Training data.** {card.training_data}",
        "",
        f"**Data terms.** {card.data_terms}",
        "",
        f"**Intended use.** {card.intended_use}",
        "",
        f"**Limits.** {card.limits}",
        "",
        "## Measured",
        "",
        "| split | cases | points | MRE (mm) | SD (mm) | SDR 2 / 2.5 / 3 / 4 mm (%) | missing precision / recall | 90 % bound coverage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in card.measured:
        sdr = " / ".join(f"{m.sdr_percent.get(r, float('nan')):.2f}" for r in SDR_COLUMNS)
        missing = " / ".join(_figure(v) for v in (m.missing_precision, m.missing_recall))
        coverage = _figure(m.error_bound_coverage_percent)
        lines.append(
            f"| {m.split} | {m.n_cases} | {m.n_points} | {m.mre_mm:.3f} | {m.sd_mm:.3f} | "
            f"{sdr} | {missing} | {coverage} |"
        )
    lines += ["", f"Weights: {card.weights_dtype}."]
    if card.fp32_mre_mm is not None:
        lines[-1] += (
            f" The float32 weights gave an MRE of {card.fp32_mre_mm:.3f} mm on the first split."
        )
    for m in card.measured:
        lines += ["", f"{m.split}: measured on {m.machine}, {m.date}, by", "", f"    {m.command}"]
    return "\n".join(lines) + "\n"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


SDR_COLUMNS = ("2.0", "2.5", "3.0", "4.0")


def print_shipped_models(models: list[ShippedModel]) -> None:
    """A table of the shipped models: what each finds and how well."""
    from rich.table import Table

    from medlandmark.console import console

    table = Table(title="Models shipped with medlandmark (medlandmark models show NAME)")
    for column in ("name", "finds", "dims", "landmarks", "measured MRE", "size"):
        table.add_column(column, no_wrap=column == "name")
    for model in models:
        first = model.card.measured[0]
        table.add_row(
            model.name,
            model.card.title,
            f"{model.card.dimensions}D",
            str(len(model.card.landmarks)),
            f"{first.mre_mm:.3f} mm ({first.split}, {first.n_cases} cases)",
            f"{model.size_mb:.1f} MB",
        )
    console.print(table)


def print_model_card(model: ShippedModel) -> None:
    """The model's card, and where its runs are."""
    from rich.markdown import Markdown

    from medlandmark.console import console

    console.print(Markdown(model.card_text or card_markdown(model.card)))
    console.print(f"runs: {model.runs}")


def weights_dtype(model: ShippedModel) -> torch.dtype:
    """The floating-point type of the shipped weights (of the first run)."""
    first = next(iter(sorted(model.runs.glob(f"*/{BEST_WEIGHTS}"))))
    return next(v.dtype for v in load_file(str(first)).values() if v.is_floating_point())
