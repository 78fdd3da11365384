"""benchmarks/gpu_check.py runs end to end on the CPU at tiny sizes, compiled rows included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402


def test_the_gpu_check_runs_every_network_and_the_short_training_on_a_cpu(tmp_path: Path) -> None:
    command = [sys.executable, "gpu_check.py", "--tiny", "--no-compile", "--steps", "1"]
    command += ["--train-minutes", "0.05", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=BENCHMARKS, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["bf16_peak_tflops"] > 0
    rows = results["networks"]
    assert [row["arch"] for row in rows] == ["unet", "hyatt", "h3de"]
    for row in rows:
        assert "error" not in row, row
        assert row["samples_per_s"] > 0 and row["tflops"] > 0 and row["parameters_m"] > 0
    training = results["training"]
    assert training["steps"] > 0 and training["best_validation_mre_mm"] > 0
    assert "samples/s" in result.stdout and "best validation MRE" in result.stdout


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own, on import
def test_a_compiled_training_step_is_timed_like_an_eager_one() -> None:
    case = gpu_check.TINY_CASES[0]
    row = gpu_check.time_training(case, torch.device("cpu"), compiled=True, steps=1)
    assert row["compiled"] is True and row["samples_per_s"] > 0 and row["warm_up_s"] > 0
