"""One table row per benchmark run, for the side-by-side comparisons of RESULTS.md: parameters,
seconds per step, steps, each stage's validation curve, and the main test split's MRE, SD, SDR and
missing-landmark precision and recall.

    .venv/bin/python benchmarks/side_by_side.py benchmarks/work/isbi2015/cpu-unet \\
        benchmarks/work/isbi2015/cpu-hyatt benchmarks/work/isbi2015/cpu-hyatt-paper

Each argument is a benchmark's run folder (``WORK/<budget>-<arch or recipe>``, with its
``results.json``). Seconds per step are the training steps alone (the batch over the median of
the epochs' samples per second in ``log.csv``); validations and checkpoints are not in them.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from medlandmark.models import network_for
from medlandmark.records.run import LOG_FILE, read_run_record

HEADER = (
    "| network (training) | parameters | s/step | steps x batch | validation MRE by step (each "
    "stage; coarse first) | test MRE | SD | SDR 2 / 2.5 / 3 / 4 mm | present called missing | missing "
    "precision / recall |"
)


def stage_facts(run_dir: Path) -> dict:
    """Parameters, seconds per step, steps, batch and validation curve of one stage's run."""
    record = read_run_record(run_dir)
    configuration = record.plan_configuration
    network = network_for(
        record.arch, configuration, len(record.landmarks), len(record.plan.modalities)
    )
    rows = list(csv.DictReader((run_dir / LOG_FILE).open()))
    rates = [float(r["samples_per_s"]) for r in rows if r.get("samples_per_s")]
    batch = record.settings.batch_size
    curve = [(int(r["step"]), float(r["val_mre_mm"])) for r in rows if r.get("val_mre_mm")]
    return {
        "parameters": sum(p.numel() for p in network.parameters()),
        "s_per_step": batch / statistics.median(rates) if rates else float("nan"),
        "steps": record.step,
        "batch": batch,
        "curve": curve,
    }


def table_row(work: Path) -> str:
    """The markdown row of one benchmark run folder."""
    results = json.loads((work / "results.json").read_text())
    stages = [stage_facts(work / "runs" / s["configuration"]) for s in results["stages"]]
    split = results["splits"][results["main_split"]]
    training = results.get("recipe") or "medlandmark"
    curve = "; ".join(
        " -> ".join(f"{mre:.2f} ({step})" for step, mre in s["curve"]) or "not validated"
        for s in stages
    )
    missing = split["missing"]
    called_missing = f"{missing['fp']} of {missing['fp'] + missing['tn']}"
    precision, recall = split.get("missing_precision"), split.get("missing_recall")
    sdr = " / ".join(f"{split['sdr'][r]:.2f}" for r in split["sdr"])
    parameters = " + ".join(f"{s['parameters'] / 1e6:.2f} M" for s in stages)
    seconds = " / ".join(f"{s['s_per_step']:.3f}" for s in stages)
    steps = " + ".join(f"{s['steps']} x {s['batch']}" for s in stages)
    return (
        f"| {results['arch']} ({training}) | {parameters} | {seconds} | {steps} "
        f"| {curve} "
        f"| **{split['mre_mm']:.3f} mm** | {split['sd_mm']:.3f} mm | {sdr} % "
        f"| {called_missing} "
        f"| {_fraction(precision)} / {_fraction(recall)} |"
    )


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+", help="benchmark run folders")
    args = parser.parse_args()
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for work in args.runs:
        print(table_row(work))


if __name__ == "__main__":
    main()
