"""ONNX export: every architecture exports, ONNX Runtime reproduces PyTorch, errors are clear."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from medlandmark.errors import MedlandmarkError  # noqa: E402
from medlandmark.inference import export  # noqa: E402
from medlandmark.inference.export import (  # noqa: E402
    OnnxNetwork,
    export_onnx,
    movedim_permutation,
    read_run_record,
    run_network,
)
from medlandmark.models import network_for  # noqa: E402
from medlandmark.models.h3de_net import h3de_sizes  # noqa: E402
from medlandmark.models.hyatt_net import hyatt_sizes  # noqa: E402
from medlandmark.records.run import RunRecord, write_run_record  # noqa: E402
from medlandmark.records.weights import CheckpointError, save_weights  # noqa: E402
from medlandmark.sliding_window import sliding_window_heatmaps  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import single_configuration_plan  # noqa: E402
from test_unet import _sizes as unet_sizes  # noqa: E402

LANDMARKS = ["nasion", "sella", "menton"]
CONFIGS = {  # architecture, then (patch, builder arguments)
    "unet-2d": ("unet", lambda: unet_sizes([64, 48], [1.0, 1.0])),
    "unet-3d": ("unet", lambda: unet_sizes([16, 32, 32], [3.0, 0.8, 0.8])),
    "hyatt": ("hyatt", lambda: ([64, 64], hyatt_sizes(0.25))),  # pads maps to its region grid
    "h3de": ("h3de", lambda: ([24, 24, 16], h3de_sizes())),  # region padding, top-k routing
}


def make_run(
    run_dir: Path, arch: str, sized: tuple[list[int], dict], channels: int = 1, seed: int = 0
) -> Path:
    """A training run folder as the training loop leaves it (random weights)."""
    patch, sizes = sized
    plan = single_configuration_plan(arch, sizes, patch, LANDMARKS, channels)
    run_dir.mkdir(parents=True)
    record = RunRecord(arch=arch, configuration="fine", plan=plan, landmarks=LANDMARKS)
    write_run_record(run_dir, record)
    torch.manual_seed(seed)
    model = network_for(arch, plan.configurations["fine"], len(LANDMARKS), channels)
    save_weights(run_dir / "model_best.safetensors", model)
    return run_dir


@pytest.fixture(scope="module")
def unet_2d_export(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("unet2d")
    run = make_run(root / "run", "unet", CONFIGS["unet-2d"][1]())
    out = root / "exported" / "model.onnx"
    export_onnx(run, out)
    return run, out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_reproduces_pytorch_heatmaps(tmp_path: Path, name: str) -> None:
    arch, make_config = CONFIGS[name]
    config = make_config()
    run = make_run(tmp_path / "run", arch, config, channels=2 if name == "unet-3d" else 1)
    out = tmp_path / "out" / "model.onnx"
    report = export_onnx(run, out)
    assert report["onnx_path"] == str(out) and out.is_file()
    assert report["opset"] == export.DEFAULT_OPSET
    channels = 2 if name == "unet-3d" else 1
    assert report["input_shape"] == ["batch", channels, *config[0]]
    assert report["max_abs_heatmap"] > 0.01  # the check compared real heatmaps, not zeros
    assert report["max_abs_heatmap_difference"] < 1e-4  # measured 1e-7 .. 3e-6
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no partial file left
    network = run_network(run, read_run_record(run))
    onnx_network = OnnxNetwork(out).eval()
    assert onnx_network.training is False
    x = torch.randn(3, channels, *config[0], generator=torch.Generator().manual_seed(7))
    outputs = onnx_network(x)
    assert isinstance(outputs, list) and len(outputs) == 1
    with torch.no_grad():
        expected = network(x)[0]
    assert outputs[0].shape == (3, len(LANDMARKS), *config[0])
    assert outputs[0].device == x.device and outputs[0].dtype == torch.float32
    torch.testing.assert_close(outputs[0], expected, atol=1e-4, rtol=1e-4)


def test_onnx_network_drives_the_sliding_window(unet_2d_export) -> None:
    run, out = unet_2d_export
    network = run_network(run, read_run_record(run))
    image = torch.randn(1, 90, 70, generator=torch.Generator().manual_seed(3))
    expected = sliding_window_heatmaps(network, image, (64, 48), batch_size=2)
    actual = sliding_window_heatmaps(
        OnnxNetwork(out).to("cpu").eval(), image, (64, 48), batch_size=2
    )
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_weights_final_are_exported(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "unet", CONFIGS["unet-2d"][1]())
    with pytest.raises(CheckpointError, match="model_final.safetensors"):
        export_onnx(run, tmp_path / "final.onnx", weights="final")
    torch.manual_seed(5)
    final = network_for("unet", read_run_record(run).plan_configuration, len(LANDMARKS))
    save_weights(run / "model_final.safetensors", final)
    export_onnx(run, tmp_path / "final.onnx", weights="final")
    x = torch.randn(1, 1, 64, 48)
    with torch.no_grad():
        expected = final.eval()(x)[0]
    torch.testing.assert_close(
        OnnxNetwork(tmp_path / "final.onnx")(x)[0], expected, atol=1e-4, rtol=1e-4
    )
    with pytest.raises(MedlandmarkError, match="weights must be one of"):
        export_onnx(run, tmp_path / "x.onnx", weights="latest")


def test_failed_parity_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    run = make_run(tmp_path / "run", "unet", CONFIGS["unet-2d"][1]())
    out = tmp_path / "out" / "model.onnx"
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)  # no difference is small enough
    with pytest.raises(MedlandmarkError, match="does not reproduce PyTorch") as caught:
        export_onnx(run, out)
    assert caught.value.path == out
    assert list(out.parent.iterdir()) == []


def test_corrupt_or_missing_onnx_files_are_named(tmp_path: Path, unet_2d_export) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(unet_2d_export[1].read_bytes()[:5000])
    for path in (garbage, truncated, tmp_path / "missing.onnx"):
        with pytest.raises(MedlandmarkError) as caught:
            OnnxNetwork(path)
        assert caught.value.path == path and str(path) in str(caught.value)
    with pytest.raises(MedlandmarkError, match=r"takes \['batch', 1, 64, 48\]"):
        OnnxNetwork(unet_2d_export[1])(torch.zeros(1, 1, 32, 32))


def test_bad_run_folders_and_opsets_are_reported(tmp_path: Path) -> None:
    with pytest.raises(MedlandmarkError, match="no run.json"):
        export_onnx(tmp_path, tmp_path / "m.onnx")
    (tmp_path / "run.json").write_text(json.dumps({"arch": "unet", "plan": {}}))
    with pytest.raises(MedlandmarkError, match="configuration: Field required"):
        export_onnx(tmp_path, tmp_path / "m.onnx")
    run = make_run(tmp_path / "run", "unet", CONFIGS["unet-2d"][1]())
    with pytest.raises(MedlandmarkError, match="opset 13 is too old"):
        export_onnx(run, tmp_path / "m.onnx", opset=13)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(("source", "target"), [(1, -1), (-1, 1), (0, 2), (3, 0), (-2, -4)])
def test_movedim_permutation_matches_torch(source: int, target: int) -> None:
    x = torch.randn(2, 3, 4, 5)
    perm = movedim_permutation(4, [source % 4], [target % 4])
    assert torch.equal(x.permute(perm), x.movedim(source, target))
