"""``report.html``: the evaluation report as one browser page, with overlays of the worst cases.

The page uses inline CSS only (no script, no font or file from the internet); its images are PNG
files in the same output folder, referenced by relative paths, so the folder can be moved or
zipped whole. Every text that comes from user files (case ids, landmark names, paths) is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from medlandmark.console import progress, warn
from medlandmark.errors import MedlandmarkError
from medlandmark.evaluation.report import (
    BOXPLOT_FILE,
    SDR_CURVE_FILE,
    WORST_CASES_SHOWN,
    format_mm,
    format_percent,
    verdict_sentences,
)
from medlandmark.io.files import atomic_write_text
from medlandmark.io.landmarks import LandmarkSet
from medlandmark.metrics import radius_key
from medlandmark.overlays import overlay_comparison

if TYPE_CHECKING:
    from medlandmark.datasets.dataset import Dataset

HTML_REPORT_FILE = "report.html"
OVERLAY_FOLDER = "worst_cases"
NO_IMAGES_NOTE = (
    "The ground truth is a folder of landmark files without images, so no overlays are drawn: "
    "evaluate against a dataset folder (with dataset.json and images/) to see them."
)
CSS = """
body { font-family: sans-serif; color: #222; max-width: 1150px; margin: 1.5em auto;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f0f0f0; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f4f4f4; padding: 0 0.2em; word-break: break-all; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figure { margin: 1em 0 2em; } figcaption { color: #444; margin-top: 0.3em; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.plots figure { margin: 0; }
.note { background: #fff8e0; border-left: 4px solid #e0b000; padding: 0.4em 1em; }
"""


@dataclass
class CaseOverlays:
    """Overlay PNG of each worst case (case id -> path relative to the report) and notes on the
    cases that have none."""

    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def write_worst_case_overlays(
    out_dir: Path,
    worst_cases: Sequence[dict],
    landmarks: Mapping[str, tuple[LandmarkSet, LandmarkSet]],
    dataset: Dataset | None,
) -> CaseOverlays:
    """Draw prediction and ground truth on the image of each of ``worst_cases`` (rows of
    ``metrics["worst_cases"]``; ``landmarks``: case id -> (prediction, truth)) into
    ``out_dir/worst_cases/<case_id>.png``; without a dataset there are no images to draw on."""
    if dataset is None:
        return CaseOverlays(notes=[NO_IMAGES_NOTE])
    overlays = CaseOverlays()
    for row in progress(worst_cases, total=len(worst_cases), description="worst-case overlays"):
        case_id = row["case_id"]
        prediction, truth = landmarks[case_id]
        relative = f"{OVERLAY_FOLDER}/{case_id}.png"
        title = f"{case_id}: MRE {format_mm(row['mre_mm'])} mm"
        try:
            image = dataset.read_image(case_id)
            overlay_comparison(
                image, prediction, truth, Path(out_dir) / relative, row["worst_landmark"], title
            )
        except MedlandmarkError as error:
            warn(f"no overlay for case '{case_id}': {error}")
            overlays.notes.append(f"No overlay for case {case_id}: {error}")
            continue
        overlays.files[case_id] = relative
    return overlays


def write_html_report(out_dir: Path, metrics: dict, overlays: CaseOverlays | None = None) -> str:
    """Write ``report.html`` (atomically) into ``out_dir``, beside the plots; return its name."""
    page = report_html(metrics, overlays or CaseOverlays(notes=[NO_IMAGES_NOTE]))
    atomic_write_text(Path(out_dir) / HTML_REPORT_FILE, page)
    return HTML_REPORT_FILE


def report_html(metrics: dict, overlays: CaseOverlays) -> str:
    """The page: summary, SDR, per landmark, missing points, plots, worst cases, conventions."""
    body = [
        "<h1>Landmark evaluation report</h1>",
        f"<p>Predictions: <code>{_text(metrics.get('pred_dir', '?'))}</code><br>"
        f"Ground truth: <code>{_text(metrics.get('gt', '?'))}</code><br>"
        "All distances are Euclidean radial errors in world millimetres "
        f"({_text(metrics.get('ndim', '?'))}D).</p>",
        *_summary(metrics),
        *_per_landmark(metrics),
        *_missing(metrics),
        *_error_bounds(metrics),
        *_verdicts(metrics),
        "<h2>Plots</h2>",
        '<div class="plots">',
        _figure(SDR_CURVE_FILE, "Success detection rate (percent of points within r mm)"),
        _figure(BOXPLOT_FILE, "Radial error per landmark"),
        "</div>",
        *_worst_cases(metrics, overlays),
        "<h2>Conventions</h2>",
        "<ul>",
        "<li>Radial error: only points present in both the prediction and the ground truth.</li>",
        f"<li>SD: {_text(metrics['sd_convention'])}.</li>",
        f"<li>SDR: {_text(metrics['sdr_rule'])}.</li>",
        f"<li>Missing landmarks: {_text(metrics['missing_rule'])}.</li>",
        "</ul>",
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head>\n<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>Landmark evaluation report</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )


def _summary(metrics: dict) -> list[str]:
    radii = [radius_key(r) for r in metrics["radii_mm"]]
    overall = [
        str(metrics["n_cases"]),
        str(metrics["n_points"]),
        format_mm(metrics["mre_mm"]),
        format_mm(metrics["sd_mm"]),
        format_mm(metrics["median_mm"]),
        format_mm(metrics.get("max_mm")),
    ]
    parts = [
        "<h2>Summary</h2>",
        _table(
            ["cases", "points", "MRE (mm)", "SD (mm)", "median (mm)", "max (mm)"],
            [overall],
            text_columns=(),
        ),
    ]
    unpredicted = metrics.get("n_gt_cases_without_prediction", 0)
    if unpredicted:
        parts.append(
            f'<p class="note">{unpredicted} ground-truth cases have no prediction and are not '
            "evaluated.</p>"
        )
    parts += [
        "<h2>Success detection rate</h2>",
        _table(
            [f"SDR {r} mm" for r in radii],
            [[format_percent(metrics["sdr"][r]) for r in radii]],
            text_columns=(),
        ),
    ]
    return parts


def _per_landmark(metrics: dict) -> list[str]:
    radii = [radius_key(r) for r in metrics["radii_mm"]]
    rows = [
        [
            name,
            str(row["n"]),
            format_mm(row["mre_mm"]),
            format_mm(row["sd_mm"]),
            *(format_percent(row["sdr"][r]) for r in radii),
        ]
        for name, row in metrics["per_landmark"].items()
    ]
    header = ["landmark", "n", "MRE (mm)", "SD (mm)", *(f"SDR {r}" for r in radii)]
    return ["<h2>Per landmark</h2>", _table(header, rows)]


def _missing(metrics: dict) -> list[str]:
    missing = metrics["missing"]
    rows = [
        ["predicted missing", f"{missing['tp']} (tp)", f"{missing['fp']} (fp)"],
        ["predicted present", f"{missing['fn']} (fn)", f"{missing['tn']} (tn)"],
    ]
    return ["<h2>Missing landmarks</h2>", _table(["", "truly missing", "truly present"], rows)]


def _error_bounds(metrics: dict) -> list[str]:
    """How often the predictions' error bounds held (nothing when they carry none)."""
    bound = metrics.get("error_bound")
    if bound is None:
        return []
    rows = [
        [name, format_percent(coverage)]
        for name, coverage in bound["per_landmark_coverage_percent"].items()
    ]
    return [
        "<h2>Error bounds</h2>",
        f"<p>The true point was within the predicted error bound for "
        f"{_text(format_percent(bound['coverage_percent']))} of {bound['n_points']} points "
        f"(median bound {_text(format_mm(bound['median_bound_mm']))} mm).</p>",
        _table(["landmark", "coverage"], rows),
    ]


def _verdicts(metrics: dict) -> list[str]:
    """The case verdicts the predictions carry, and the flagged cases (nothing without any)."""
    verdict = metrics.get("verdict")
    if verdict is None:
        return []
    parts = ["<h2>Case verdicts</h2>"]
    parts += [f"<p>{_text(s)}</p>" for s in verdict_sentences(verdict)]
    rows = [
        [
            row["case_id"],
            row["status"],
            format_mm(row["mre_mm"]),
            "yes" if row["bad"] else "no",
            "; ".join(row["reasons"]),
        ]
        for row in verdict["flagged"]
    ]
    if rows:
        parts.append(
            _table(
                ["case", "verdict", "MRE (mm)", "bad", "reasons"], rows, text_columns=(0, 1, 3, 4)
            )
        )
    return parts


def _worst_cases(metrics: dict, overlays: CaseOverlays) -> list[str]:
    worst = metrics["worst_cases"][:WORST_CASES_SHOWN]
    parts = ["<h2>Worst cases</h2>"]
    if not worst:
        return [*parts, '<p class="note">No case has an evaluated point.</p>']
    rows = [
        [row["case_id"], format_mm(row["mre_mm"]), format_mm(row["max_mm"]), row["worst_landmark"]]
        for row in worst
    ]
    parts.append(
        _table(["case", "MRE (mm)", "max (mm)", "worst landmark"], rows, text_columns=(0, 3))
    )
    parts += [f'<p class="note">{_text(note)}</p>' for note in overlays.notes]
    if overlays.files:
        parts.append(
            "<p>Predictions are red circles, ground truth green crosses, joined by a yellow line; "
            "3D cases show the three orthogonal slices through the predicted worst landmark.</p>"
        )
    for row in worst:
        src = overlays.files.get(row["case_id"])
        if src is not None:
            caption = (
                f"{row['case_id']}: MRE {format_mm(row['mre_mm'])} mm, largest error "
                f"{format_mm(row['max_mm'])} mm at {row['worst_landmark']}"
            )
            parts.append(_figure(src, caption))
    return parts


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Sequence[int] = (0,)
) -> str:
    """An HTML table of escaped cells; columns other than ``text_columns`` are right-aligned."""
    text = set(text_columns)
    lines = ["<table>", "<tr>" + "".join(f"<th>{_text(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = (
            f"<td>{_text(cell)}</td>" if i in text else f'<td class="num">{_text(cell)}</td>'
            for i, cell in enumerate(row)
        )
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _figure(src: str, caption: str) -> str:
    """An image (``src`` relative to the report) with its caption, both escaped."""
    return (
        f'<figure><img src="{_text(quote(src))}" alt="{_text(caption)}">'
        f"<figcaption>{_text(caption)}</figcaption></figure>"
    )


def _text(value) -> str:
    """``value`` as HTML text, safe inside elements and quoted attributes."""
    return html.escape(str(value), quote=True)
