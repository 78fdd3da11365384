"""Ship a trained cascade in the package: measure it in float32 and float16 on a test split,
keep float16 when it moves the MRE by at most 0.01 mm either way (a larger move, even a gain on
the test split, means the half-precision weights are another model, not a copy), and write the
model card with what was measured.

    .venv/bin/python benchmarks/ship_model.py ceph-isbi2015-19 \\
        benchmarks/work/isbi2015-fine0/cpu-unet/runs --dataset benchmarks/work/isbi2015/dataset \\
        --split test1

Writes src/medlandmark/shipped_models/NAME/ (model.json, MODEL_CARD.md, runs/) and
WORK/ship/NAME-{float32,float16}/ (the measured copies, their predictions and evaluations).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import recipes
import torch
from host import cpu_model

from medlandmark.datasets.dataset import Dataset
from medlandmark.evaluation import evaluate
from medlandmark.inference.batch import PredictOptions, predict_files
from medlandmark.inference.shipped import ship_runs, write_model_card
from medlandmark.records.model_card import SHIPPED_FOLDER, Measurement, ModelCard
from medlandmark.records.run import read_run_record

HALF_PRECISION_TOLERANCE_MM = 0.01
ISBI_TERMS = (
    "ISBI 2015 Grand Challenge in cephalometric X-ray images (Wang et al., Medical Image "
    "Analysis 2016): the images and annotations are distributed for research; check the "
    "challenge's terms before any other use. These weights inherit that restriction."
)
SPECS = {
    "ceph-isbi2015-19": {
        "title": "19 cephalometric landmarks in lateral cephalograms",
        "input_conventions": "A lateral cephalogram (2D X-ray of the skull), any size; JPEG, PNG, "
        "BMP, TIFF, MetaImage, NIfTI or DICOM. Trained on images of 1935 x 2400 pixels at 0.1 mm "
        "as the challenge gives them; mirrored or turned images are found by the orientation "
        "search (predict --orientation auto). Give the pixel spacing (--spacing) of files that "
        "carry none: it is taken as 0.1 mm otherwise.",
        "training_data": "ISBI 2015 challenge training images 001-150 (the mean of the senior "
        "and junior annotations); a coarse stage at 2.02 mm and a fine stage at 0.4 mm, both "
        "trained on folds 1-4 and validated (thresholds, error bounds, verdict limits) on fold 0 "
        "(30 images); medlandmark's U-Net recipe at the CPU budget (benchmarks/isbi2015.py "
        "--budget cpu, 45 minutes on 2 cores).",
        "data_terms": ISBI_TERMS,
        "intended_use": "Research on cephalometric analysis; a first draft of landmarks for an "
        "expert to check (each point has a 90 % error radius and each case a verdict).",
        "limits": "Trained on 150 images of one challenge (one clinic, one device); not validated "
        "on other devices, other resolutions, other populations or pathologies. Not a medical "
        "device.",
    },
    "brain-afids-32": {
        "title": "32 anatomical fiducials (AFIDs) in T1-weighted brain MRI",
        "input_conventions": "A T1-weighted brain MRI volume (NIfTI, NRRD, MetaImage or DICOM) "
        "with a correct header: 3D headers are trusted (predict --orientation fixed). Landmarks "
        "are returned in world millimetres (LPS), missing where the field of view cuts them off.",
        "training_data": "40 synthetic volumes warped from the one MNI152NLin2009cAsym template "
        "with its AFIDs ground truth (medlandmark convert afids-synth, seed 0: random affine and "
        "elastic warps, other spacings and orientations, field-of-view crops, bias, gamma and "
        "noise); medlandmark's U-Net cascade at the CPU budget (benchmarks/afids3d.py --budget "
        "cpu), with nnU-Net's 3D rotation range (+-30 degrees); its run.json holds the training "
        "arrays' typical orientation, to which prediction turns the fine windows (predict "
        "--window-orientation, anatomy by default in 3D). It has never seen a real subject's scan.",
        "data_terms": "AFIDs landmarks CC-BY-4.0 (the AFIDs project); the MNI152NLin2009cAsym "
        "template under the McGill copyright notice (free use with attribution).",
        "intended_use": "Demonstration and research: a starting point to fine-tune on real "
        "annotated scans (train --init-from), not a tool for real subjects as it is.",
        "limits": "One brain (the template) deformed: real anatomy varies more, real scans "
        "differ in contrast and artefacts; expect larger errors and wrong 'missing' answers on "
        "real data until fine-tuned on it. On synthetic volumes with stronger variation than "
        "training (thin slabs, 2-3 mm spacings, larger turns) about half of the cases are "
        "flagged doubtful or failed; the errors and wrong 'missing' answers sit in those, mostly "
        "volumes cut to a thin slab (benchmarks/RESULTS.md, issue 17). Not a medical device.",
    },
}


def measured_copy(runs: Path, out: Path, half: bool, data: Path, split: str) -> dict:
    """Ship ``runs`` into ``out``, predict the split with it, evaluate: the evaluation's metrics
    with the split's summary (:func:`recipes.split_summary`) under ``summary``."""
    copy = ship_runs(runs, out / "model", half=half)
    dataset = Dataset(data)
    images = [dataset.case(c).image_path for c in dataset.split(split)]
    started = time.perf_counter()
    rows = predict_files(copy, images, out / "predictions", PredictOptions(device="cpu"))
    predict_s = time.perf_counter() - started
    metrics = evaluate(out / "predictions", data, out / "evaluation", radii=recipes.RADII_MM)
    metrics["predict_s"] = round(predict_s, 1)
    metrics["summary"] = recipes.split_summary(metrics, rows, predict_s)
    return metrics


def measurement(metrics: dict, split: str, command: str) -> Measurement:
    summary = metrics["summary"]
    machine = f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    return Measurement(
        split=split,
        n_cases=summary["n_cases"],
        n_points=summary["n_points"],
        mre_mm=round(summary["mre_mm"], 4),
        sd_mm=round(summary["sd_mm"], 4),
        sdr_percent={k: round(v, 2) for k, v in summary["sdr"].items()},
        missing_precision=_rounded(summary["missing_precision"]),
        missing_recall=_rounded(summary["missing_recall"]),
        error_bound_coverage_percent=(metrics.get("error_bound") or {}).get("coverage_percent"),
        per_case_mre_mm={k: round(v, 4) for k, v in metrics["per_case_mre_mm"].items()},
        command=command,
        machine=machine,
        date=datetime.now(timezone.utc).date().isoformat(),
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(SPECS))
    parser.add_argument("runs", type=Path, help="the trained folder of runs")
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("--work", type=Path, default=recipes.WORK / "ship")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # as run from benchmarks/, without this machine's interpreter path
    command = shlex.join(
        ["python", *(sys.orig_argv[1:] if argv is None else ["ship_model.py", *argv])]
    )
    results = {}
    for dtype, half in (("float32", False), ("float16", True)):
        out = args.work / f"{args.name}-{dtype}"
        results[dtype] = measured_copy(args.runs, out, half, args.dataset, args.split)
        print(f"{dtype}: MRE {results[dtype]['mre_mm']:.4f} mm ({results[dtype]['predict_s']} s)")
    cost = results["float16"]["mre_mm"] - results["float32"]["mre_mm"]
    chosen = "float16" if abs(cost) <= HALF_PRECISION_TOLERANCE_MM else "float32"
    print(f"float16 changes the MRE by {cost:+.4f} mm: shipping {chosen}")
    first = read_run_record(next(p.parent for p in sorted(args.runs.glob("*/run.json"))))
    card = ModelCard(
        name=args.name,
        dimensions=first.plan.spatial_dims,
        landmarks=first.landmarks,
        spacing_mm=first.spacing_mm,
        fp32_mre_mm=round(results["float32"]["mre_mm"], 4),
        measured=[measurement(results[chosen], args.split, command)],
        **SPECS[args.name],
    )
    target = SHIPPED_FOLDER / args.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(args.work / f"{args.name}-{chosen}" / "model", target)
    model = write_model_card(target, card)
    print(json.dumps({"shipped": str(target), "size_mb": round(model.size_mb, 2)}))


if __name__ == "__main__":
    main()
