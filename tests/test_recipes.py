"""The benchmark recipes (benchmarks/isbi2015.py, benchmarks/afids3d.py) end to end on tiny
datasets and budgets of a few seconds: every step runs for real, a rerun reuses the finished
training and picks up a test split added to the source, and results.json holds every test
split's figures."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medlandmark.datasets.afids_synth import SynthOptions
from medlandmark.training.loop import TrainOptions

from .conftest import shared_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import afids3d  # noqa: E402
import isbi2015  # noqa: E402
import recipes  # noqa: E402
import side_by_side  # noqa: E402

TINY = [
    "--minutes",
    "0.05",
    "--gpu-memory",
    "1",
    "--base-features",
    "8",
    "--device",
    "cpu",
    "--threads",
    "1",
]
SPLIT_KEYS = {
    "n_cases",
    "n_points",
    "mre_mm",
    "sd_mm",
    "sdr",
    "sdr_2mm",
    "sdr_2.5mm",
    "sdr_3mm",
    "sdr_4mm",
    "missing",
    "missing_recall",
    "missing_precision",
}


@pytest.fixture
def short_probe(monkeypatch):
    """Probe epochs of one step: the pipeline, not the timing, is under test."""
    monkeypatch.setattr(recipes, "PROBE_ITERATIONS", 1)


def _link_isbi_case(folder: Path, split: str, number: int, as_number: int | None = None) -> None:
    """Image ``number`` of the real ISBI 2015 data and its two annotations, in the official
    layout under ``folder`` (named ``as_number``: the shared data has no Test2Data)."""
    source, name = shared_path("isbi2015"), f"{as_number or number:03d}"
    (folder / "RawImage" / split).mkdir(parents=True, exist_ok=True)
    os.symlink(
        next((source / "RawImage").glob(f"*/{number:03d}.jpg")),
        folder / "RawImage" / split / f"{name}.jpg",
    )
    for annotator in ("400_senior", "400_junior"):
        (folder / "AnnotationsByMD" / annotator).mkdir(parents=True, exist_ok=True)
        os.symlink(
            source / "AnnotationsByMD" / annotator / f"{number:03d}.txt",
            folder / "AnnotationsByMD" / annotator / f"{name}.txt",
        )


def _check_results(results: dict, work: Path, splits: dict[str, int], stages: list[str]) -> None:
    written = json.loads(next(work.glob("*/results.json")).read_text())
    assert written == json.loads(json.dumps(results))
    assert list(written["splits"]) == list(splits)
    for split, cases in splits.items():
        figures = written["splits"][split]
        assert set(figures) >= SPLIT_KEYS and figures["n_cases"] == cases and figures["failed"] == 0
        assert math.isfinite(figures["mre_mm"]) and math.isfinite(figures["sd_mm"])
    assert [s["configuration"] for s in written["stages"]] == stages
    for stage in written["stages"]:
        assert (
            stage["steps"] >= 1
            and stage["probe"]["step_s"] > 0
            and stage["within_budget"] in (True, False)
        )
    assert written["training_s"] == pytest.approx(
        sum(s["total_s"] for s in written["stages"]), abs=0.2
    )
    assert written["machine"]["cores"] >= 1 and written["command"] and written["date"]


def test_isbi2015_recipe_trains_the_cascade_and_reports_every_test_split(
    tmp_path, short_probe, capsys
):
    source, work = tmp_path / "source", tmp_path / "work"
    for number in range(1, 7):
        _link_isbi_case(source, "TrainingData", number)
    for number in (151, 152):
        _link_isbi_case(source, "Test1Data", number)
    results = isbi2015.main(
        ["--budget", "cpu", "--source", str(source), "--work", str(work), *TINY]
    )
    _check_results(results, work, {"test1": 2}, ["2d_coarse", "2d_fine"])
    test1 = results["splits"]["test1"]  # a tiny model may place points outside: then missing
    assert test1["n_points"] + test1["missing"]["fp"] == 2 * 19
    assert [t["target"] for t in results["targets"]] == ["mre_mm <= 1.5"]
    printed = capsys.readouterr().out
    assert (
        f"| test1 | 2 | {test1['n_points']} |" in printed
        and "command: isbi2015.py --budget cpu" in printed
    )
    runs = work / "cpu-unet-0.05min-1gb-8f" / "runs"
    fine = json.loads((runs / "2d_fine" / "run.json").read_text())
    assert fine["fold"] == 0 and fine["options"]["coarse_run"] == str(runs / "2d_coarse")
    row = side_by_side.table_row(runs.parent)  # the RESULTS.md row: both stages' curves
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == side_by_side.HEADER.count("|") - 1
    assert cells[0] == "unet (medlandmark)" and cells[5] == f"**{test1['mre_mm']:.3f} mm**"
    assert cells[4].count(";") == 1 and "not validated" not in cells[4], cells[4]

    # Test2Data appears: the rerun converts again, reuses the trained runs and reports both splits
    _link_isbi_case(source, "Test2Data", 153, as_number=301)
    again = isbi2015.main(["--budget", "cpu", "--source", str(source), "--work", str(work), *TINY])
    assert all(stage["reused"] for stage in again["stages"])
    assert list(again["splits"]) == ["test1", "test2"] and again["splits"]["test2"]["n_cases"] == 1
    assert again["splits"]["test1"]["mre_mm"] == pytest.approx(results["splits"]["test1"]["mre_mm"])


def test_afids3d_recipe_reports_missing_landmarks(tmp_path, short_probe, monkeypatch):
    monkeypatch.setattr(afids3d, "CASES", 6)  # the last third (2 cases) is the test split
    monkeypatch.setattr(afids3d, "SYNTH_OPTIONS", SynthOptions(spacing_scale=3.0))
    work = tmp_path / "work"
    source = shared_path("afids_mni152")
    augment = ["--augment", "p_field_of_view_cut=0.3"]  # every stage trains with the override
    results = afids3d.main(
        ["--budget", "gpu", "--arch", "unet", "--source", str(source), "--work", str(work)]
        + [*TINY, *augment]
    )
    _check_results(
        results, work, {"test": 2}, ["3d_fullres"]
    )  # tiny volumes: one stage, no cascade
    figures = results["splits"]["test"]
    counts = figures["missing"]
    assert sum(counts.values()) == 2 * 32
    truly_missing = counts["tp"] + counts["fn"]
    assert figures["missing_recall"] == (counts["tp"] / truly_missing if truly_missing else None)
    assert {t["target"] for t in results["targets"]} == {"mre_mm <= 1.3", "missing_recall >= 0.95"}
    run_json = next(work.glob("*/runs/*/run.json"))
    record = json.loads(run_json.read_text())
    assert record["shape_model"] is not None  # what reports the landmarks the field of view cut off
    assert record["options"]["augment"] == {"p_field_of_view_cut": 0.3}
    assert run_json.parents[2].name.endswith("-aug-p_field_of_view_cut0.3")


def test_a_recipe_refuses_an_unknown_augmentation_before_any_work(tmp_path, capsys):
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as stop:
        afids3d.main(["--budget", "cpu", "--work", str(work), "--augment", "nonsense=1"])
    assert stop.value.code == 2
    assert "bad augmentation setting: nonsense" in capsys.readouterr().err
    assert not work.exists()  # no dataset converted, nothing planned


@given(
    step_s=st.floats(0.01, 10.0),
    validation_s=st.floats(0.0, 30.0),
    rest_s=st.floats(0.0, 20.0),
    probe_s=st.floats(1.0, 60.0),
    budget_s=st.floats(1.0, 3600.0),
)
def test_the_clock_ends_a_budgeted_stage_within_its_budget(
    step_s, validation_s, rest_s, probe_s, budget_s
):
    """The stage trains for a time budget that, with the probe and the start-up, fits the stage's
    budget and leaves only the safety margin; its step cap is never what ends a run going at the
    probe's pace; at that pace it validates at most VALIDATIONS times."""
    probe = {"wall_s": probe_s, "step_s": step_s, "validation_s": validation_s, "rest_s": rest_s}
    options = recipes.budgeted_options(TrainOptions(), probe, budget_s)
    assert options.iterations_per_epoch <= recipes.MAX_ITERATIONS_PER_EPOCH
    usable_s = recipes.SAFETY * (budget_s - probe_s) - rest_s
    if usable_s > 1.0:  # a stage trains for at least a second, whatever the budget
        assert probe_s + rest_s + options.time_budget_s <= budget_s + 0.05
        assert budget_s - (probe_s + rest_s + options.time_budget_s) <= (
            (1 - recipes.SAFETY) * (budget_s - probe_s) + 0.05
        )
    cap_steps = options.epochs * options.iterations_per_epoch
    paced_steps = (options.time_budget_s - recipes.VALIDATIONS * validation_s) / step_s
    if paced_steps > options.iterations_per_epoch:
        assert cap_steps >= paced_steps  # the time budget, not the cap, ends a run at that pace
        paced_epochs = paced_steps / options.iterations_per_epoch
        assert math.ceil(paced_epochs / options.validate_every) <= recipes.VALIDATIONS + 1
