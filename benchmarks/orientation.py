"""Predictions on re-oriented copies of a test split: every image mirrored left-right or up-down,
or rotated by 90 / 180 / 270 degrees, its landmarks moved with it; then predicted and evaluated
like the original, and the MRE, the case verdicts and the error-bound coverage compared.

    .venv/bin/python benchmarks/orientation.py benchmarks/work/isbi2015/cpu-unet/runs \\
        --dataset benchmarks/work/isbi2015/dataset --split test1 --spacing 0.1 \\
        --transforms none mirror_lr rot180 --threads 1

Writes WORK/datasets/<transform> (made once), WORK/<orientation>/<transform>/{predictions,
evaluation} (WORK defaults to the model folder's parent / orientation; --orientation is
predict's) and WORK/<orientation>/results.json; prints one row per transform.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medlandmark.console import info
from medlandmark.datasets.dataset import Dataset
from medlandmark.evaluation import evaluate
from medlandmark.inference.batch import PredictOptions, predict_files
from medlandmark.io.files import atomic_write_text
from medlandmark.io.geometry import Geometry, index_to_world, world_to_index
from medlandmark.io.images import read_image, write_image
from medlandmark.io.landmarks import LandmarkSet, read_landmarks, write_landmarks
from medlandmark.preprocessing.orientation import Orientation, candidate_orientations

TRANSFORMS = {  # this script's names -> the orientation search's candidates
    "none": "as given",
    "mirror_lr": "mirrored left-right",
    "mirror_ud": "mirrored up-down",
    "rot90": "turned 90 degrees",
    "rot180": "turned 180 degrees",
    "rot270": "turned 270 degrees",
}


def orientation_named(geometry: Geometry, transform: str) -> Orientation:
    """The move called ``transform`` (numpy's rot90 turns counterclockwise as displayed), or a
    candidate of the orientation search by its name (3D: ``flipped axis 0``...)."""
    candidates = {o.name: o for o in candidate_orientations(geometry, turns=True)}
    name = TRANSFORMS.get(transform, transform)
    if name not in candidates:
        known = ", ".join([*TRANSFORMS, *candidates])
        raise ValueError(f"unknown transform {transform!r} (use {known})")
    return candidates[name]


def write_transformed_split(
    dataset_root: Path, split: str, transform: str, out: Path, spacing_mm: float | None = None
) -> Path:
    """A dataset of the split's cases under ``transform``, the header kept (float MetaImage:
    lossless, with spacing; ``spacing_mm``: the 2D pixel spacing, when the images store none)."""
    dataset = Dataset(dataset_root)
    spec = dataset.spec
    case_ids = dataset.split(split)
    for case_id in case_ids:
        case = dataset.case(case_id)
        image = read_image(case.image_path, spacing_xy_mm=spec.spacing_mm)
        truth = read_landmarks(case.landmarks_path, geometry=image.geometry, names=spec.landmarks)
        move = orientation_named(image.geometry, transform)
        index = world_to_index(truth.points_mm, image.geometry)
        geometry = move.geometry(image.geometry)
        moved = index_to_world(move.index(index, tuple(image.geometry.shape)), geometry)
        array = move.array(image.array)
        write_image(out / "images" / f"{case_id}.mha", array, geometry)
        write_landmarks(out / "landmarks" / f"{case_id}.json", LandmarkSet(spec.landmarks, moved))
    document = spec.model_dump(mode="json", exclude_none=True)
    if spacing_mm is not None:
        document["spacing_mm"] = [spacing_mm, spacing_mm]
    document["splits"] = {"test": case_ids}
    document["description"] = f"{dataset_root.name} {split}, {transform}"
    atomic_write_text(out / "dataset.json", json.dumps(document, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a run folder or a folder of runs")
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--split", default="test1")
    parser.add_argument("--spacing", type=float, required=True, help="pixel spacing in mm")
    parser.add_argument("--transforms", nargs="+", default=["none", "mirror_lr", "rot180"])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--orientation", choices=["auto", "search", "fixed"], default="auto")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or args.model.parent / "orientation"
    results = {"model": str(args.model), "split": args.split, "transforms": {}}
    for transform in args.transforms:
        started = time.perf_counter()
        folder = work / args.orientation / transform
        data = work / "datasets" / transform
        if not (data / "dataset.json").is_file():
            write_transformed_split(args.dataset, args.split, transform, data, args.spacing)
        options = PredictOptions(
            device=args.device,
            spacing_xy_mm=(args.spacing, args.spacing),
            orientation=args.orientation,
        )
        predict_files(args.model, [data / "images"], folder / "predictions", options)
        metrics = evaluate(folder / "predictions", data, folder / "evaluation")
        verdict = metrics.get("verdict", {})
        bound = metrics.get("error_bound", {})
        results["transforms"][transform] = {
            "mre_mm": metrics["mre_mm"],
            "sd_mm": metrics["sd_mm"],
            "sdr": metrics["sdr"],
            "missing": metrics["missing"],
            "verdicts": verdict.get("counts"),
            "ok_mre_mm": verdict.get("ok_cases", {}).get("mre_mm"),
            "bad_cases": verdict.get("bad_cases"),
            "bad_flagged_percent": verdict.get("bad_flagged_percent"),
            "flagged_good_percent": verdict.get("flagged_good_percent"),
            "bound_coverage_percent": bound.get("coverage_percent"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        info(f"{transform}: {json.dumps(results['transforms'][transform])}")
    results["orientation"] = args.orientation
    atomic_write_text(
        work / args.orientation / "results.json", json.dumps(results, indent=1) + "\n"
    )
    for transform, row in results["transforms"].items():
        print(
            f"| {transform} | {row['mre_mm']:.3f} | {row['verdicts']} | "
            f"{row['bad_flagged_percent']} | {row['flagged_good_percent']} | "
            f"{row['bound_coverage_percent']} |"
        )
    return results


if __name__ == "__main__":
    main()
