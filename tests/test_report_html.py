"""`evaluate` writes report.html: the numbers of metrics.json, escaped user text, overlays of the
worst cases (2D images, 3D orthogonal slices), and a page that a real headless browser renders
with every image loaded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from medlandmark.datasets.dataset import Dataset, DatasetSpec, write_spec
from medlandmark.datasets.synthetic import make_synthetic_dataset
from medlandmark.evaluation import evaluate
from medlandmark.evaluation.html_report import (
    HTML_REPORT_FILE,
    NO_IMAGES_NOTE,
    CaseOverlays,
    report_html,
)
from medlandmark.io.geometry import Geometry
from medlandmark.io.images import write_image
from medlandmark.io.landmarks import LandmarkSet, write_landmarks
from medlandmark.metrics import radius_key
from medlandmark.overlays import (
    PREDICTION_COLOUR,
    TRUTH_COLOUR,
    largest_error_landmark,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_CASES_2D = 6
OFFSET_STEP_MM = 0.5  # case i is moved by (i + 1) * 0.5 mm: the last case is the worst
BROWSER_TIMEOUT_S = 60


class ReportParser(HTMLParser):
    """Tables (rows of unescaped cell texts), image sources and script tags of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.scripts = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def table_after(page: str, heading: str, tables: list) -> list[list[str]]:
    """The table that follows ``<h2>heading</h2>`` (tables are counted in page order)."""
    before = page[: page.index(f"<h2>{heading}</h2>")]
    return tables[before.count("<table>")]


def coloured_pixels(rgb: np.ndarray, colour: str) -> int:
    target = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int(np.count_nonzero(np.abs(rgb[..., :3] - target).max(axis=-1) < 0.12))


def write_offset_predictions(dataset: Dataset, out: Path) -> None:
    """Case i moved by ``(i + 1) * OFFSET_STEP_MM`` along the first axis; the first landmark of
    the first case is reported missing."""
    for i, case_id in enumerate(dataset.case_ids):
        truth = dataset.read_landmarks(case_id)
        points_mm = truth.points_mm.copy()
        points_mm[:, 0] += (i + 1) * OFFSET_STEP_MM
        if i == 0:
            points_mm[0] = np.nan
        write_landmarks(out / f"{case_id}.json", LandmarkSet(truth.names, points_mm))


@pytest.fixture(scope="module")
def report_2d(tmp_path_factory) -> Path:
    """The output folder of `evaluate` on a small synthetic 2D dataset (PNG images)."""
    root = tmp_path_factory.mktemp("html2d")
    dataset = Dataset(make_synthetic_dataset(root / "dataset", num_cases=NUM_CASES_2D, size_px=64))
    write_offset_predictions(dataset, root / "pred")
    evaluate(root / "pred", dataset.root, root / "out")
    return root / "out"


# --- content ---------------------------------------------------------------------------------


def test_html_report_shows_the_numbers_of_metrics_json(report_2d):
    metrics = json.loads((report_2d / "metrics.json").read_text())
    page = (report_2d / HTML_REPORT_FILE).read_text(encoding="utf-8")
    tables = parse(report_2d / HTML_REPORT_FILE).tables
    assert metrics["files"]["html_report"] == HTML_REPORT_FILE
    k = metrics["n_landmarks"]
    errors_mm = [(i + 1) * OFFSET_STEP_MM for i in range(NUM_CASES_2D) for _ in range(k)][1:]
    assert metrics["mre_mm"] == pytest.approx(np.mean(errors_mm), abs=1e-6)
    summary = table_after(page, "Summary", tables)
    assert summary[1] == [
        str(metrics["n_cases"]),
        str(metrics["n_points"]),
        f"{metrics['mre_mm']:.3f}",
        f"{metrics['sd_mm']:.3f}",
        f"{metrics['median_mm']:.3f}",
        f"{metrics['max_mm']:.3f}",
    ]
    radii = [radius_key(r) for r in metrics["radii_mm"]]
    sdr = table_after(page, "Success detection rate", tables)
    assert sdr == [[f"SDR {r} mm" for r in radii], [f"{metrics['sdr'][r]:.2f}%" for r in radii]]
    per_landmark = table_after(page, "Per landmark", tables)
    assert [row[0] for row in per_landmark[1:]] == list(metrics["per_landmark"])
    first = per_landmark[1]
    assert first[2] == f"{metrics['per_landmark'][first[0]]['mre_mm']:.3f}"
    missing = metrics["missing"]
    assert missing == {"tp": 0, "fp": 1, "fn": 0, "tn": NUM_CASES_2D * k - 1}
    assert table_after(page, "Missing landmarks", tables)[1:] == [
        ["predicted missing", "0 (tp)", "1 (fp)"],
        ["predicted present", "0 (fn)", f"{missing['tn']} (tn)"],
    ]
    worst = table_after(page, "Worst cases", tables)
    assert [row[0] for row in worst[1:]] == [row["case_id"] for row in metrics["worst_cases"]]
    assert worst[1][0] == f"case{NUM_CASES_2D - 1:03d}"
    report_md = (report_2d / "report.md").read_text()
    assert f"| {summary[1][2]} | {summary[1][3]} |" in report_md  # the same MRE and SD as report.md


def test_every_image_of_the_page_is_a_png_in_the_output_folder(report_2d):
    parsed = parse(report_2d / HTML_REPORT_FILE)
    metrics = json.loads((report_2d / "metrics.json").read_text())
    assert parsed.scripts == 0
    assert len(parsed.images) == 2 + 5  # the two plots and the five worst cases
    for src in parsed.images:
        assert not re.match(r"^[a-z]+:|^/", src), src  # relative, nothing from elsewhere
        assert (report_2d / src).read_bytes()[:8] == PNG_MAGIC
    assert set(metrics["files"]["plots"]) | set(metrics["files"]["overlays"]) == set(parsed.images)
    page = (report_2d / HTML_REPORT_FILE).read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert not list(report_2d.rglob(".*partial*"))


def test_worst_case_overlay_draws_prediction_and_truth_on_the_image(report_2d):
    metrics = json.loads((report_2d / "metrics.json").read_text())
    worst_case = metrics["worst_cases"][0]["case_id"]
    assert metrics["files"]["overlays"][0] == f"worst_cases/{worst_case}.png"
    rgb = matplotlib.image.imread(report_2d / metrics["files"]["overlays"][0])
    assert coloured_pixels(rgb, PREDICTION_COLOUR) > 50
    assert coloured_pixels(rgb, TRUTH_COLOUR) > 50
    grey = rgb[..., :3].mean(axis=-1)
    assert np.unique(np.round(grey, 2)).size > 50  # the image itself is drawn under the points


def test_plain_landmark_folder_renders_without_overlays_and_escapes_case_ids(tmp_path):
    names = ["p", "q"]
    case_id = 'a<b>&"c'  # a file name, so anything goes: must not become markup
    points = np.array([[1.0, 2.0], [3.0, 4.0]])
    write_landmarks(tmp_path / "gt" / f"{case_id}.csv", LandmarkSet(names, points))
    write_landmarks(tmp_path / "pred" / f"{case_id}.csv", LandmarkSet(names, points + [3.0, 4.0]))
    metrics = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    page = (tmp_path / "out" / HTML_REPORT_FILE).read_text(encoding="utf-8")
    parsed = parse(tmp_path / "out" / HTML_REPORT_FILE)
    assert metrics["files"]["overlays"] == []
    assert sorted(parsed.images) == sorted(metrics["files"]["plots"])
    assert NO_IMAGES_NOTE in page
    assert case_id not in page
    assert "a&lt;b&gt;&amp;&quot;c" in page
    assert table_after(page, "Worst cases", parsed.tables)[1][:2] == [case_id, "5.000"]


def test_report_html_escapes_every_user_text():
    metrics = {
        "pred_dir": "<script>alert(1)</script>",
        "gt": "x&y",
        "ndim": 2,
        "n_cases": 1,
        "n_points": 1,
        "mre_mm": 1.0,
        "sd_mm": 0.0,
        "median_mm": 1.0,
        "max_mm": 1.0,
        "radii_mm": [2.0],
        "sdr": {"2.0": 100.0},
        "sd_convention": "sd",
        "sdr_rule": "rule",
        "missing_rule": "missing",
        "missing": {"tp": 0, "fp": 0, "fn": 0, "tn": 1},
        "per_landmark": {"<i>L</i>": {"n": 1, "mre_mm": 1.0, "sd_mm": 0.0, "sdr": {"2.0": 100.0}}},
        "worst_cases": [
            {"case_id": "c'1", "mre_mm": 1.0, "max_mm": 1.0, "worst_landmark": "<i>L</i>"}
        ],
    }
    overlays = CaseOverlays({"c'1": 'worst_cases/c\'1 "x".png'}, ["note <u>"])
    page = report_html(metrics, overlays)
    for raw in ("<script>", "<i>", "<u>", "x&y", "c'1", '"x"'):
        assert raw not in page
    escaped = ("&lt;script&gt;", "&lt;i&gt;L&lt;/i&gt;", "note &lt;u&gt;", "x&amp;y", "c&#x27;1")
    for text in escaped:
        assert text in page
    assert 'src="worst_cases/c%271%20%22x%22.png"' in page


# --- 3D --------------------------------------------------------------------------------------

NAMES_3D = ["<b>sella</b>", "A&B", "genu"]
GEOMETRY_3D = Geometry.identity((24, 24, 24), (1.5, 1.0, 1.0))


def make_dataset_3d(root: Path) -> Path:
    """Two 24^3 volumes (a bright ball on a noisy background) with three landmarks each."""
    spec = DatasetSpec(name="tiny3d", spatial_dims=3, landmarks=NAMES_3D, modalities=["ct"])
    write_spec(root, spec)
    rng = np.random.default_rng(0)
    z, y, x = np.indices(GEOMETRY_3D.shape)
    for i, case_id in enumerate(["v1", "v2"]):
        ball = ((z - 12) ** 2 + (y - 12 - i) ** 2 + (x - 11) ** 2 < 49).astype(np.float32)
        volume = 100.0 * ball + rng.normal(0.0, 10.0, GEOMETRY_3D.shape).astype(np.float32)
        write_image(root / "images" / f"{case_id}.nii.gz", volume, GEOMETRY_3D)
        points_mm = np.array([[8.0, 9.0, 15.0], [12.0, 14.0, 18.0], [15.0, 10.0, 9.0 + i]])
        write_landmarks(root / "landmarks" / f"{case_id}.csv", LandmarkSet(NAMES_3D, points_mm))
    return root


def test_3d_worst_cases_get_orthogonal_slices_and_names_are_escaped(tmp_path):
    dataset = Dataset(make_dataset_3d(tmp_path / "dataset"))
    offsets_mm = {
        "v1": [[1.0, 0, 0], [0, 2.0, 0], [0, 0, 0]],
        "v2": [[0, 0, 0], [0, 0, 0], [3.0, 0, 4.0]],
    }
    for case_id, offset in offsets_mm.items():
        prediction = LandmarkSet(NAMES_3D, dataset.read_landmarks(case_id).points_mm + offset)
        write_landmarks(tmp_path / "pred" / f"{case_id}.mrk.json", prediction)
    metrics = evaluate(tmp_path / "pred", dataset.root, tmp_path / "out")
    out = tmp_path / "out"
    assert [row["case_id"] for row in metrics["worst_cases"]] == ["v2", "v1"]
    assert metrics["worst_cases"][0]["worst_landmark"] == "genu"
    assert metrics["files"]["overlays"] == ["worst_cases/v2.png", "worst_cases/v1.png"]
    for overlay in metrics["files"]["overlays"]:
        rgb = matplotlib.image.imread(out / overlay)
        height, width = rgb.shape[:2]
        assert width > 2 * height  # one row of three slices (sagittal, coronal, axial)
        assert coloured_pixels(rgb, PREDICTION_COLOUR) > 20
        assert coloured_pixels(rgb, TRUTH_COLOUR) > 20
    page = (out / HTML_REPORT_FILE).read_text(encoding="utf-8")
    parsed = parse(out / HTML_REPORT_FILE)
    assert "<b>" not in page and "A&B" not in page
    assert "&lt;b&gt;sella&lt;/b&gt;" in page and "A&amp;B" in page
    assert [row[0] for row in table_after(page, "Per landmark", parsed.tables)[1:]] == NAMES_3D
    assert all((out / src).is_file() for src in parsed.images)
    assert len(parsed.images) == 2 + 2


def test_largest_error_landmark_skips_points_missing_on_either_side():
    truth = LandmarkSet(["a", "b", "c", "d"], [[0.0, 0.0], [0.0, 0.0], [np.nan, np.nan], [0, 0]])
    prediction = LandmarkSet(["d", "c", "b", "a"], [[np.nan] * 2, [9.0, 9.0], [3.0, 4.0], [1, 0]])
    assert largest_error_landmark(prediction, truth) == "b"
    nothing = LandmarkSet(["a"], [[np.nan, np.nan]])
    assert largest_error_landmark(nothing, truth) is None


# --- a real browser --------------------------------------------------------------------------


def chromium() -> str:
    """The chromium executable, or skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").is_file():
        found = "/usr/bin/chromium"
    if found is None:
        pytest.skip("chromium not found: headless-browser report test skipped")
    return found


def run_browser(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False
    )


LOAD_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((image) => image.complete && image.naturalWidth > 0).length;
  document.title = "loaded " + loaded + " of " + images.length;
});
</script>"""


def test_headless_chromium_renders_the_page_with_every_image_loaded(report_2d, tmp_path):
    chromium()
    report = report_2d / HTML_REPORT_FILE
    started = time.monotonic()
    screenshot = tmp_path / "page.png"
    result = run_browser(
        [f"--screenshot={screenshot}", "--window-size=1200,2000", report.as_uri()],
        tmp_path / "profile1",
    )
    assert screenshot.is_file(), result.stderr[-2000:]
    rgb = matplotlib.image.imread(screenshot)[..., :3]
    assert rgb.shape[:2] == (2000, 1200)
    assert np.unique(np.round(rgb.reshape(-1, 3), 2), axis=0).shape[0] > 30  # text, tables, plots
    assert (rgb.mean(axis=-1) < 0.5).mean() > 0.005  # dark ink on the white page
    # The report has no script, so a copy of it with a probe that counts the loaded images (the
    # page's own folder as its base URL) tells whether the browser could decode every <img>.
    page = report.read_text(encoding="utf-8")
    base = f'<base href="{report_2d.as_uri()}/">'
    harness = tmp_path / "harness" / "probe.html"
    harness.parent.mkdir()
    probed = page.replace("<head>", f"<head>\n{base}", 1)
    harness.write_text(probed.replace("</body>", f"{LOAD_PROBE}\n</body>", 1), encoding="utf-8")
    result = run_browser(
        ["--virtual-time-budget=5000", "--dump-dom", harness.as_uri()], tmp_path / "profile2"
    )
    title = re.search(r"<title>(.*?)</title>", result.stdout)
    assert title is not None, result.stderr[-2000:]
    count = len(parse(report).images)
    assert count == 7
    assert title.group(1) == f"loaded {count} of {count}"
    assert time.monotonic() - started < BROWSER_TIMEOUT_S
