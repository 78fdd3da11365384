"""run.json is validated by a schema before anything in it sizes a network or names a file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from medlandmark.datasets.synthetic import make_synthetic_dataset
from medlandmark.errors import MedlandmarkError
from medlandmark.inference.export import export_onnx
from medlandmark.inference.predictor import Predictor
from medlandmark.planning import plan_dataset
from medlandmark.records.plan import load_plan
from medlandmark.records.run import read_run_record


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "ds", num_cases=4, size_px=32)
    plan = plan_dataset(root, gpu_memory_gb=1.0).model_dump(mode="json")
    return {
        "arch": "unet",
        "configuration": plan["default_configuration"],
        "plan": plan,
        "landmarks": plan["landmarks"],
        "symmetric_pairs": [["tip_left", "tip_right"]],
        "spacing_mm": [0.5, 0.5],
        "presence_threshold": 0.3,
        "status": "finished",
        "shape_model": {
            "reference_mm": [[float(i), float(i % 3)] for i in range(len(plan["landmarks"]))],
            "inlier_mm": 2.0,
            "singular_values": [0.8, 1.2],
        },
    }


def _write(folder: Path, record: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(record))
    return folder


def test_a_run_json_written_by_training_is_accepted(tmp_path, record):
    read = read_run_record(_write(tmp_path / "run", record))
    assert read.model_dump(mode="json", exclude_unset=True) == json.loads(json.dumps(record))
    assert (
        read.plan_configuration.name == record["configuration"] and read.presence_threshold == 0.3
    )


def _configuration(r: dict) -> dict:
    return r["plan"]["configurations"][r["configuration"]]


BROKEN = {
    "cache folder as a path": (
        lambda r: _configuration(r).update(data_identifier="../../etc"),
        "data_identifier",
    ),
    "cache folder '..'": (
        lambda r: _configuration(r).update(data_identifier=".."),
        "data_identifier",
    ),
    "unknown configuration": (lambda r: r.update(configuration="3d_nowhere"), "not in its plan"),
    "negative patch": (lambda r: _configuration(r).update(patch_size=[-4, 32]), "patch_size"),
    "huge patch": (lambda r: _configuration(r).update(patch_size=[10**9, 32]), "patch_size"),
    "NaN spacing": (
        lambda r: _configuration(r).update(spacing_mm=[float("nan"), 1.0]),
        "spacing_mm",
    ),
    "3D patch in a 2D plan": (
        lambda r: _configuration(r).update(patch_size=[32, 32, 32]),
        "is not 2D",
    ),
    "4D plan": (lambda r: r["plan"].update(spatial_dims=4), "spatial_dims"),
    "infinite threshold": (
        lambda r: r.update(presence_threshold=float("inf")),
        "presence_threshold",
    ),
    "repeated landmarks": (lambda r: r.update(landmarks=["a", "a"]), "repeat"),
    "pair of unknown names": (lambda r: r.update(symmetric_pairs=[["tip_left", "ghost"]]), "ghost"),
    "arch as a path": (lambda r: r.update(arch="../evil"), "arch"),
    "no plan": (lambda r: r.pop("plan"), "plan"),
    "transpose not a permutation": (
        lambda r: r["plan"].update(transpose_forward=[0, 0]),
        "permutation",
    ),
    "shape model of other landmarks": (
        lambda r: r["shape_model"]["reference_mm"].pop(),
        "shape_model does not match",
    ),
    "3D shape model in a 2D run": (
        lambda r: r["shape_model"].update(reference_mm=[[0.0, 1.0, 2.0]] * len(r["landmarks"])),
        "shape_model does not match",
    ),
    "NaN in the shape model": (
        lambda r: r["shape_model"]["reference_mm"][0].__setitem__(0, float("nan")),
        "finite",
    ),
    "shape model without a range": (
        lambda r: r["shape_model"].update(singular_values=[1.2, 0.8]),
        "singular_values",
    ),
    "shape model with a zero inlier distance": (
        lambda r: r["shape_model"].update(inlier_mm=0),
        "inlier_mm",
    ),
    "a typical orientation that is no rotation": (
        lambda r: r["shape_model"].update(typical_orientation=[[2.0, 0.0], [0.0, 1.0]]),
        "typical_orientation",
    ),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_or_hostile_run_json_is_refused_naming_the_file(tmp_path, record, name):
    mutate, expected = BROKEN[name]
    broken = copy.deepcopy(record)
    mutate(broken)
    folder = _write(tmp_path / "run", broken)
    with pytest.raises(MedlandmarkError, match="run schema") as raised:
        read_run_record(folder)
    assert expected in str(raised.value) and str(folder / "run.json") in str(raised.value)
    with pytest.raises(MedlandmarkError, match="run schema"):
        Predictor.from_run(folder, device="cpu")
    with pytest.raises(MedlandmarkError, match="run schema"):
        export_onnx(folder, tmp_path / "model.onnx")


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "\xff\xfe"])
def test_run_json_that_is_not_an_object_is_refused(tmp_path, text):
    (tmp_path / "run.json").write_text(text, encoding="latin-1")
    with pytest.raises(MedlandmarkError, match="invalid run.json"):
        read_run_record(tmp_path)


PLAN_EDITS = {
    "a misspelt key": (lambda p: p["training"].update(learning_rat=0.1), "learning_rat"),
    "a negative batch": (
        lambda p: next(iter(p["configurations"].values())).update(batch_size=-1),
        "batch_size",
    ),
    "an unknown default": (
        lambda p: p.update(default_configuration="3d_nowhere"),
        "default_configuration",
    ),
    "a cascade link to nowhere": (
        lambda p: next(iter(p["configurations"].values())).update(next_stage="ghost"),
        "ghost",
    ),
    "an unknown normalisation": (lambda p: p["normalization"][0].update(scheme="minmax"), "scheme"),
}


@pytest.mark.parametrize("name", PLAN_EDITS)
def test_a_hand_edited_plan_is_validated_when_loaded(tmp_path, record, name):
    edit, expected = PLAN_EDITS[name]
    plan = copy.deepcopy(record["plan"])
    edit(plan)
    (tmp_path / "plans.json").write_text(json.dumps(plan))
    with pytest.raises(MedlandmarkError, match="plan schema") as raised:
        load_plan(tmp_path)
    assert expected in str(raised.value) and str(tmp_path / "plans.json") in str(raised.value)
    (tmp_path / "plans.json").write_text(json.dumps(record["plan"]))
    assert load_plan(tmp_path).model_dump(mode="json") == record["plan"]
