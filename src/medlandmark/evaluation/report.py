"""Render evaluation metrics: PNG plots, ``report.md`` and the console summary (no metrics here)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.markup import escape
from rich.table import Table

from medlandmark.console import console
from medlandmark.io.files import atomic_write_bytes, atomic_write_text
from medlandmark.metrics import (
    evaluated,
    radius_key,
    sdr_curve,
    success_detection_rates,
)

REPORT_FILE = "report.md"
BOXPLOT_FILE = "radial_errors_per_landmark.png"
SDR_CURVE_FILE = "sdr_curve.png"
WORST_CASES_SHOWN = 5


def write_report(out_dir: Path, metrics: dict, errors_mm: np.ndarray, names: Sequence[str]) -> dict:
    """Write the plots and ``report.md`` into ``out_dir``; return their file names."""
    out_dir = Path(out_dir)
    save_png(out_dir / BOXPLOT_FILE, landmark_boxplot(errors_mm, names))
    save_png(out_dir / SDR_CURVE_FILE, sdr_curve_figure(errors_mm, metrics["radii_mm"]))
    atomic_write_text(out_dir / REPORT_FILE, report_markdown(metrics))
    return {"report": REPORT_FILE, "plots": [BOXPLOT_FILE, SDR_CURVE_FILE]}


def new_figure(width_inches: float, height_inches: float) -> tuple[Figure, object]:
    """A figure with one axes on its own Agg canvas: pyplot and its global backend stay untouched,
    so a notebook that imports medlandmark keeps its own."""
    figure = Figure(figsize=(width_inches, height_inches))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def save_png(path: Path, figure: Figure) -> None:
    """Render ``figure`` to PNG bytes and write them atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def landmark_boxplot(errors_mm: np.ndarray, names: Sequence[str]) -> Figure:
    """Box plot of the radial errors of each landmark (evaluated points only)."""
    errors_mm = np.asarray(errors_mm, dtype=np.float64).reshape(-1, len(names))
    columns = [evaluated(errors_mm[:, k]) for k in range(len(names))]
    figure, axes = new_figure(max(6.0, 0.45 * len(names) + 2.0), 4.5)
    positions = np.arange(1, len(names) + 1)
    axes.boxplot(columns, positions=positions, showfliers=True, flierprops={"markersize": 3})
    axes.set_xticks(positions, list(names), rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("radial error (mm)")
    axes.set_title("Radial error per landmark")
    axes.set_ylim(bottom=0)
    axes.grid(axis="y", alpha=0.3)
    return figure


def sdr_curve_figure(errors_mm: np.ndarray, radii_mm: Sequence[float]) -> Figure:
    """Percent of points within ``r`` for ``r`` from 0 to twice the largest radius."""
    radii, percent = sdr_curve(errors_mm, 2.0 * max(radii_mm))
    figure, axes = new_figure(6.0, 4.5)
    axes.plot(radii, percent, color="tab:blue")
    marked = success_detection_rates(errors_mm, radii_mm)
    axes.plot(radii_mm, marked, "o", color="tab:red")
    for r, p in zip(radii_mm, marked, strict=True):
        if not np.isnan(p):
            axes.annotate(
                f"{p:.1f}%", (r, p), textcoords="offset points", xytext=(4, -12), fontsize=8
            )
    axes.set_xlabel("radius r (mm)")
    axes.set_ylabel("points within r (%)")
    axes.set_title("Success detection rate")
    axes.set_xlim(0, radii[-1])
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    return figure


def report_markdown(metrics: dict) -> str:
    """The text of ``report.md``: summary, SDR, per-landmark, missing points, worst cases, plots."""
    radii = [radius_key(r) for r in metrics["radii_mm"]]
    sections = (
        _summary_lines(metrics)
        + _sdr_lines(metrics, radii)
        + _per_landmark_lines(metrics, radii)
        + _error_bound_lines(metrics)
        + _verdict_lines(metrics, radii)
        + _missing_and_worst_lines(metrics)
        + _plots_and_conventions_lines(metrics)
    )
    return "\n".join(sections)


def _summary_lines(metrics: dict) -> list[str]:
    lines = [
        "# Landmark evaluation report",
        "",
        f"Predictions: `{metrics.get('pred_dir', '?')}`  ",
        f"Ground truth: `{metrics.get('gt', '?')}`  ",
        f"All distances are Euclidean radial errors in world millimetres ({metrics.get('ndim', '?')}D).",
        "",
        "## Summary",
        "",
        "| cases | points | MRE (mm) | SD (mm) | median (mm) | max (mm) |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {metrics['n_cases']} | {metrics['n_points']} | {format_mm(metrics['mre_mm'])} | "
        f"{format_mm(metrics['sd_mm'])} | {format_mm(metrics['median_mm'])} | "
        f"{format_mm(metrics.get('max_mm'))} |",
        "",
    ]
    unpredicted = metrics.get("n_gt_cases_without_prediction", 0)
    if unpredicted:
        lines += [f"{unpredicted} ground-truth cases have no prediction and are not evaluated.", ""]
    return lines


def _error_bound_lines(metrics: dict) -> list[str]:
    """How often the predictions' error bounds held (nothing when they carry none)."""
    bound = metrics.get("error_bound")
    if bound is None:
        return []
    lines = [
        "## Error bounds",
        "",
        f"The true point was within the predicted error bound for "
        f"{format_percent(bound['coverage_percent'])} of {bound['n_points']} points "
        f"(median bound {format_mm(bound['median_bound_mm'])} mm).",
        "",
        "| landmark | coverage |",
        "|---|---|",
    ]
    for name, coverage in bound["per_landmark_coverage_percent"].items():
        lines.append(f"| {_cell(name)} | {format_percent(coverage)} |")
    return [*lines, ""]


def verdict_sentences(verdict: dict) -> list[str]:
    """The verdicts in plain sentences, shared by the Markdown and HTML reports."""
    counts = verdict["counts"]
    ok = verdict["ok_cases"]
    sentences = [
        f"Verdicts: {counts['ok']} ok, {counts['doubtful']} doubtful, {counts['failed']} failed"
        + (f", {verdict['without_verdict']} without one." if verdict["without_verdict"] else "."),
        f"The {ok['n_cases']} ok cases: MRE {format_mm(ok['mre_mm'])} mm, SD "
        f"{format_mm(ok['sd_mm'])} mm over {ok['n_points']} points.",
    ]
    if verdict["bad_cases"]:
        sentences.append(
            f"Of {verdict['bad_cases']} bad cases, {format_percent(verdict['bad_flagged_percent'])} "
            "were flagged doubtful or failed."
        )
    else:
        sentences.append("No case was bad.")
    if verdict["flagged_cases"]:
        sentences.append(
            f"Of {verdict['flagged_cases']} flagged cases, "
            f"{format_percent(verdict['flagged_good_percent'])} were good."
        )
    sentences.append(f"Rule: {verdict['bad_case_rule']}.")
    return sentences


def _verdict_lines(metrics: dict, radii: list[str]) -> list[str]:
    """The case verdicts the predictions carry (nothing when they carry none)."""
    verdict = metrics.get("verdict")
    if verdict is None:
        return []
    lines = ["## Case verdicts", "", *(f"{s}  " for s in verdict_sentences(verdict)), ""]
    ok_sdr = verdict["ok_cases"]["sdr"]
    lines += [
        "| cases | " + " | ".join(f"SDR {r} mm" for r in radii) + " |",
        "|---|" + "---:|" * len(radii),
        "| ok | " + " | ".join(format_percent(ok_sdr.get(r)) for r in radii) + " |",
        "| all | " + " | ".join(format_percent(metrics["sdr"][r]) for r in radii) + " |",
        "",
    ]
    if verdict["flagged"]:
        lines += ["| case | verdict | MRE (mm) | bad | reasons |", "|---|---|---:|---|---|"]
        for row in verdict["flagged"]:
            lines.append(
                f"| {_cell(row['case_id'])} | {row['status']} | {format_mm(row['mre_mm'])} | "
                f"{'yes' if row['bad'] else 'no'} | {_cell('; '.join(row['reasons']))} |"
            )
        lines.append("")
    return lines


def _sdr_lines(metrics: dict, radii: list[str]) -> list[str]:
    return [
        "## Success detection rate",
        "",
        "| " + " | ".join(f"SDR {r} mm" for r in radii) + " |",
        "|" + "---:|" * len(radii),
        "| " + " | ".join(format_percent(metrics["sdr"][r]) for r in radii) + " |",
        "",
    ]


def _per_landmark_lines(metrics: dict, radii: list[str]) -> list[str]:
    lines = [
        "## Per landmark",
        "",
        "| landmark | n | MRE (mm) | SD (mm) | " + " | ".join(f"SDR {r}" for r in radii) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(radii),
    ]
    for name, row in metrics["per_landmark"].items():
        sdr = " | ".join(format_percent(row["sdr"][r]) for r in radii)
        lines.append(
            f"| {_cell(name)} | {row['n']} | {format_mm(row['mre_mm'])} | "
            f"{format_mm(row['sd_mm'])} | {sdr} |"
        )
    return lines


def _missing_and_worst_lines(metrics: dict) -> list[str]:
    missing = metrics["missing"]
    lines = [
        "",
        "## Missing landmarks",
        "",
        "| | truly missing | truly present |",
        "|---|---:|---:|",
        f"| predicted missing | {missing['tp']} (tp) | {missing['fp']} (fp) |",
        f"| predicted present | {missing['fn']} (fn) | {missing['tn']} (tn) |",
        "",
        "## Worst cases",
        "",
        "| case | MRE (mm) | max (mm) | worst landmark |",
        "|---|---:|---:|---|",
    ]
    for row in metrics["worst_cases"][:WORST_CASES_SHOWN]:
        lines.append(
            f"| {_cell(row['case_id'])} | {format_mm(row['mre_mm'])} | "
            f"{format_mm(row['max_mm'])} | {_cell(row['worst_landmark'])} |"
        )
    return lines


def _plots_and_conventions_lines(metrics: dict) -> list[str]:
    return [
        "",
        "## Plots",
        "",
        f"![Radial error per landmark]({BOXPLOT_FILE})",
        "",
        f"![Success detection rate]({SDR_CURVE_FILE})",
        "",
        "## Conventions",
        "",
        "- Radial error: only points present in both the prediction and the ground truth.",
        f"- SD: {metrics['sd_convention']}.",
        f"- SDR: {metrics['sdr_rule']}.",
        f"- Missing landmarks: {metrics['missing_rule']}.",
        "",
    ]


def print_summary(metrics: dict, out_dir: Path) -> None:
    """Print the main figures as a table, then where the report is."""
    table = Table(title="Landmark evaluation", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_row("cases", str(metrics["n_cases"]))
    table.add_row("points", str(metrics["n_points"]))
    mre, sd = format_mm(metrics["mre_mm"]), format_mm(metrics["sd_mm"])
    table.add_row("MRE ± SD", f"{mre} ± {sd} mm")
    table.add_row("median", f"{format_mm(metrics['median_mm'])} mm")
    for radius, percent in metrics["sdr"].items():
        table.add_row(f"SDR {radius} mm", format_percent(percent))
    missing = metrics["missing"]
    table.add_row("missing, found missing", f"{missing['tp']} of {missing['tp'] + missing['fn']}")
    table.add_row("present, called missing", f"{missing['fp']} of {missing['fp'] + missing['tn']}")
    bound = metrics.get("error_bound")
    if bound is not None:
        table.add_row("within the error bound", format_percent(bound["coverage_percent"]))
    verdict = metrics.get("verdict")
    if verdict is not None:
        counts = verdict["counts"]
        table.add_row(
            "verdicts ok / doubtful / failed",
            f"{counts['ok']} / {counts['doubtful']} / {counts['failed']}",
        )
        table.add_row("MRE of the ok cases", f"{format_mm(verdict['ok_cases']['mre_mm'])} mm")
    console.print(table)
    console.print(f"report: {escape(str(Path(out_dir) / REPORT_FILE))}", soft_wrap=True)
    html = metrics.get("files", {}).get("html_report")
    if html is not None:
        console.print(f"report for a browser: {escape(str(Path(out_dir) / html))}", soft_wrap=True)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_mm(value: float | None) -> str:
    """Millimetres with 3 decimals (``n/a`` for no value), as every report shows them."""
    return "n/a" if value is None else f"{value:.3f}"


def format_percent(value: float | None) -> str:
    """A percentage with 2 decimals (``n/a`` for no value)."""
    return "n/a" if value is None else f"{value:.2f}%"
