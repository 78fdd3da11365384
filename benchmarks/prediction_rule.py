"""Which outputs give HYATT-Net's points: the full-resolution head alone, or the mean of the
points of its three heads (the paper's rule)? Measured on a trained run's validation cases (its
held-out fold, whole cached images, world mm), never on a test split.

    .venv/bin/python benchmarks/prediction_rule.py RUN_DIR [RUN_DIR ...] [--weights best|final]

RUN_DIR is a run folder with validation cases (``--fold 0``-``4``), e.g. a benchmark's
``benchmarks/work/isbi2015/cpu-hyatt/runs/2d_coarse``. Prints MRE, SD and SDR per rule and run,
and the same as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from host import cpu_model

from medlandmark import metrics
from medlandmark.io.geometry import index_to_world
from medlandmark.models import load_run_network
from medlandmark.preprocessing import cache_folder, load_cached_case
from medlandmark.records.run import read_run_record
from medlandmark.training.validation import predict_cached_case

RULES = ("full_resolution", "mean_of_heads")


def compare_rules(run_dir: Path, weights: str = "best") -> dict:
    """MRE, SD and SDR of each rule on the run's validation cases."""
    record = read_run_record(run_dir)
    if not record.val_cases:
        raise SystemExit(f"{run_dir}: the run has no validation cases (trained with --fold all)")
    network = load_run_network(run_dir, record, weights)
    configuration = record.plan_configuration
    dataset = Path(record.dataset_path or ".")
    preprocessed = Path(record.options.get("preprocessed") or dataset / "preprocessed")
    folder = cache_folder(preprocessed, configuration)
    cases = [load_cached_case(folder, case_id) for case_id in record.val_cases]
    result = {"run": str(run_dir), "arch": record.arch, "cases": len(cases), "rules": {}}
    for rule in RULES:
        started = time.perf_counter()
        predicted, truth = [], []
        for case in cases:
            points, _ = predict_cached_case(
                network, case, configuration.patch_size, torch.device("cpu"), prediction=rule
            )
            predicted.append(index_to_world(points, case.geometry))
            truth.append(index_to_world(case.landmarks_index, case.geometry))
        errors = metrics.radial_errors_mm(predicted, truth)
        result["rules"][rule] = {
            **metrics.error_statistics(errors),
            "sdr": metrics.sdr_by_radius(errors, metrics.DEFAULT_RADII_MM),
            "seconds": round(time.perf_counter() - started, 1),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--weights", choices=["best", "final"], default="best")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [compare_rules(run, args.weights) for run in args.runs]
    if args.json:
        print(
            json.dumps(
                {"machine": f"{platform.node()} {cpu_model()}", "results": results}, indent=1
            )
        )
        return
    for result in results:
        print(f"{result['run']} ({result['arch']}, {result['cases']} validation cases)")
        for rule, row in result["rules"].items():
            sdr = " / ".join(f"{v:.1f}" for v in row["sdr"].values())
            print(
                f"  {rule:16s} MRE {row['mre_mm']:.3f} mm  SD {row['sd_mm']:.3f}  SDR {sdr} %  ({row['seconds']} s)"
            )


if __name__ == "__main__":
    main()
