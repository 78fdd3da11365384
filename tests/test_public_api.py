"""The public API: lazy names from ``medlandmark``, a light start-up, and no global side effects."""

from __future__ import annotations

import json
import subprocess
import sys

import medlandmark

HEAVY = ("torch", "matplotlib", "SimpleITK", "scipy")


def _modules_after(code: str) -> dict[str, bool]:
    """Which heavy libraries a fresh interpreter has loaded after running ``code``."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_and_help_load_neither_torch_nor_matplotlib() -> None:
    assert not any(_modules_after("import medlandmark").values())
    help_text = (
        "from medlandmark.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert not any(_modules_after(help_text).values())
    train_help = help_text.replace("['--help']", "['train', '--help']")
    assert not any(_modules_after(train_help).values())


def test_every_public_name_resolves_to_what_its_module_defines() -> None:
    assert set(medlandmark.__all__) == {"MedlandmarkError", "__version__", *medlandmark._PUBLIC}
    assert len(medlandmark.__all__) >= 12 and set(medlandmark.__all__) <= set(dir(medlandmark))
    from medlandmark.inference.predictor import Predictor
    from medlandmark.training.loop import train

    assert medlandmark.Predictor is Predictor and medlandmark.train is train
    for name in medlandmark.__all__:
        assert getattr(medlandmark, name) is not None, name


def test_reports_leave_the_callers_matplotlib_backend_alone(tmp_path) -> None:
    code = f"""
import matplotlib
matplotlib.use("svg")
import numpy as np
from medlandmark.evaluation.report import write_report
metrics = {{"radii_mm": [2.0], "n_cases": 1, "n_points": 2, "mre_mm": 1.0, "sd_mm": 0.5, "median_mm": 1.0,
           "sdr": {{"2.0": 100.0}}, "per_landmark": {{}}, "missing": {{"tp": 0, "fp": 0, "fn": 0, "tn": 2}},
           "worst_cases": [], "sd_convention": "", "sdr_rule": "", "missing_rule": ""}}
write_report({str(tmp_path)!r}, metrics, np.array([[0.5, 1.5]]), ["a", "b"])
import sys
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["svg", "False"]
    assert (tmp_path / "sdr_curve.png").read_bytes()[:4] == b"\x89PNG"
