"""Models shipped in the package: ship_runs, the model card, models list/show, predict --model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medlandmark.cli import main as cli
from medlandmark.errors import MedlandmarkError
from medlandmark.inference.predictor import Predictor
from medlandmark.inference.shipped import card_markdown, ship_runs, write_model_card
from medlandmark.records.model_card import (
    SHIPPED_FOLDER,
    Measurement,
    ModelCard,
    read_model_card,
    shipped_model,
    shipped_models,
)
from medlandmark.training.loop import TrainOptions, train

from .conftest import shared_path, synthetic_training_set

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import afids3d  # noqa: E402  (the benchmark that made brain-afids-32's test split)


def _card(name: str, landmarks: list[str]) -> ModelCard:
    measured = Measurement(
        split="test",
        n_cases=2,
        n_points=18,
        mre_mm=1.25,
        sd_mm=0.5,
        sdr_percent={"2.0": 80.0, "2.5": 85.0, "3.0": 90.0, "4.0": 95.0},
        per_case_mre_mm={"case008": 1.0, "case009": 1.5},
        command="ship_model.py x",
        machine="cpu-2c",
        date="2026-12-05",
    )
    return ModelCard(
        name=name,
        title="nine blobs",
        dimensions=2,
        landmarks=landmarks,
        input_conventions="synthetic images",
        training_data="synthetic",
        data_terms="none",
        intended_use="tests",
        limits="toy",
        measured=[measured],
    )


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A dataset and a folder with one tiny trained run (fold 0: calibrated)."""
    root = tmp_path_factory.mktemp("ship")
    dataset = synthetic_training_set(root / "ds", num_cases=10, size_px=48)
    options = TrainOptions(epochs=2, iterations_per_epoch=5, validate_every=2, seed=1)
    train(dataset, root / "runs" / "2d", options)
    return dataset, root / "runs"


def test_a_shipped_copy_drops_local_paths_halves_the_weights_and_predicts_the_same(
    trained_runs, tmp_path: Path
) -> None:
    dataset, runs = trained_runs
    out = tmp_path / "models" / "blobs-9"
    shipped_runs = ship_runs(runs, out, half=True)
    record = json.loads((shipped_runs / "2d" / "run.json").read_text())
    assert record.get("dataset_path") is None
    assert record["plan"].get("dataset_path") is None
    assert "preprocessed" not in record["options"] and "coarse_run" not in record["options"]
    tensors = load_file(str(shipped_runs / "2d" / "model_best.safetensors"))
    assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    assert shipped_models(tmp_path / "models") == []  # no card yet: not a shipped model
    original = load_file(str(runs / "2d" / "model_best.safetensors"))
    assert tensors.keys() == original.keys()

    landmarks = record["landmarks"]
    model = write_model_card(out, _card("blobs-9", landmarks))
    assert model.card.weights_dtype == "float16"
    assert [m.name for m in shipped_models(tmp_path / "models")] == ["blobs-9"]
    assert read_model_card(out).measured[0].per_case_mre_mm["case009"] == 1.5
    assert "| test | 2 | 18 | 1.250 |" in (out / "MODEL_CARD.md").read_text()

    image = next((dataset / "images").iterdir())
    full = Predictor.from_run(runs, device="cpu").predict(image)
    half = Predictor.from_run(shipped_model("blobs-9", tmp_path / "models").runs, device="cpu")
    found = half.predict(image)
    assert np.nanmax(np.abs(found.landmarks.points_mm - full.landmarks.points_mm)) < 0.5
    np.testing.assert_allclose(found.peak, full.peak, atol=0.02)


def test_an_unknown_name_lists_the_shipped_models(tmp_path: Path) -> None:
    with pytest.raises(MedlandmarkError, match="no shipped model called 'nope'.*shipped: none"):
        shipped_model("nope", tmp_path)
    with pytest.raises(MedlandmarkError, match="no shipped model called 'nope'"):
        Predictor.from_pretrained("nope")


def test_models_list_and_show_and_predict_arguments(capfd) -> None:
    from medlandmark.console import configure

    configure(quiet=False)
    assert cli(["models", "list"]) == 0
    listed = capfd.readouterr()
    for model in shipped_models():
        assert model.name in listed.out + listed.err
        assert cli(["models", "show", model.name]) == 0
        shown = capfd.readouterr()
        assert model.card.title in shown.out + shown.err
    assert cli(["models", "show"]) == 2
    assert "needs the name" in capfd.readouterr().err
    assert cli(["predict", "--model", "nope", "image.png", "-o", "out"]) == 2
    assert "no shipped model called 'nope'" in capfd.readouterr().err
    assert cli(["predict", "image.png", "-o", "out"]) == 2
    assert "needs a run folder and at least one input" in capfd.readouterr().err


def test_every_shipped_card_matches_its_runs() -> None:
    """Each card names its runs' landmarks, and its Markdown is the card's."""
    for model in shipped_models(SHIPPED_FOLDER):
        first = next(iter(sorted(model.runs.glob("*/run.json"))))
        assert json.loads(first.read_text())["landmarks"] == model.card.landmarks
        for run in model.runs.glob("*/run.json"):  # no path of the machine that shipped it
            assert "dataset_path" not in json.loads(run.read_text())["plan"], run
        assert model.card_text == card_markdown(model.card)
        assert model.size_mb < 25.0


@pytest.mark.shared_data
def test_the_shipped_cephalometric_model_reproduces_its_card(tmp_path: Path) -> None:
    """predict --model ceph-isbi2015-19 on three test1 images, then evaluate: each case's MRE
    is the one on the model card (measured on all 150 by benchmarks/ship_model.py)."""
    from medlandmark.datasets.converters import convert_isbi2015

    names = {m.name for m in shipped_models()}
    if "ceph-isbi2015-19" not in names:
        pytest.skip("ceph-isbi2015-19 is not shipped in this checkout")
    source = shared_path("isbi2015")
    card = shipped_model("ceph-isbi2015-19").card
    cases = ["151", "200", "263"]
    linked = tmp_path / "source"
    for split, case in [("TrainingData", "001")] + [("Test1Data", c) for c in cases]:
        (linked / "RawImage" / split).mkdir(parents=True, exist_ok=True)
        image = source / "RawImage" / split / f"{case}.jpg"
        (linked / "RawImage" / split / f"{case}.jpg").symlink_to(image)
        for annotator in ("400_senior", "400_junior"):
            folder = linked / "AnnotationsByMD" / annotator
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{case}.txt").symlink_to(
                source / "AnnotationsByMD" / annotator / f"{case}.txt"
            )
    dataset = convert_isbi2015(linked, tmp_path / "dataset")
    images = [str(dataset / "images" / f"{case}.jpg") for case in cases]
    out = tmp_path / "predicted"
    assert cli(["predict", "--model", "ceph-isbi2015-19", *images, "-o", str(out)]) == 0
    assert (
        cli(["evaluate", "--pred", str(out), "--gt", str(dataset), "--out", str(tmp_path / "e")])
        == 0
    )
    per_case = json.loads((tmp_path / "e" / "metrics.json").read_text())["per_case_mre_mm"]
    for case in cases:
        assert per_case[case] == pytest.approx(card.measured[0].per_case_mre_mm[case], abs=0.01)


def _afids_test_cases(out: Path, indices: list[int]) -> list[str]:
    """Cases of the AFIDs benchmark's test split (benchmarks/afids3d.py's template, seed and
    options), regenerated one by one: case k depends only on the seed and k."""
    from medlandmark.datasets import afids_synth as synth
    from medlandmark.datasets.dataset import write_spec

    source = shared_path("afids_mni152")
    template = source / afids3d.TEMPLATE
    loaded = synth.load_template(template, source / afids3d.FCSV)
    every_id = synth.synth_case_ids(afids3d.CASES)
    ids = [every_id[index] for index in indices]
    for index, case_id in zip(indices, ids, strict=True):
        rng = synth.case_rng(afids3d.DATA_SEED, index)
        synth.write_synth_case(loaded, out, case_id, rng, afids3d.SYNTH_OPTIONS)
    write_spec(out, synth.synth_spec(template, ids, afids3d.DATA_SEED, "default"))
    return ids


@pytest.mark.shared_data
def test_the_shipped_brain_model_reproduces_its_card(tmp_path: Path) -> None:
    """predict --model brain-afids-32 on two regenerated test volumes, then evaluate: each
    case's MRE is the one on the model card (measured on all 20 by benchmarks/ship_model.py)."""
    if "brain-afids-32" not in {m.name for m in shipped_models()}:
        pytest.skip("brain-afids-32 is not shipped in this checkout")
    card = shipped_model("brain-afids-32").card
    cases = _afids_test_cases(tmp_path / "dataset", [43, 58])
    images = [str(tmp_path / "dataset" / "images" / f"{case}.nii.gz") for case in cases]
    out = tmp_path / "predicted"
    assert cli(["predict", "--model", "brain-afids-32", *images, "-o", str(out)]) == 0
    evaluated = ["evaluate", "--pred", str(out), "--gt", str(tmp_path / "dataset")]
    assert cli([*evaluated, "--out", str(tmp_path / "e")]) == 0
    per_case = json.loads((tmp_path / "e" / "metrics.json").read_text())["per_case_mre_mm"]
    for case in cases:
        assert per_case[case] == pytest.approx(card.measured[0].per_case_mre_mm[case], abs=0.01)
