"""Seconds per image of `predict`: ISBI 2015 with the coarse-to-fine cascade, and the AFIDs volume.

Speed depends on the planned network sizes, not on trained weights, so the runs are built with
seeded random weights at the plan's sizes (pass --gpu-memory to plan for a smaller budget).

    python benchmarks/predict.py [--gpu-memory 2] [--arch unet] [--images 3] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from medlandmark.datasets.converters import convert_afids, convert_isbi2015
from medlandmark.inference.predictor import Predictor
from medlandmark.io.images import read_image
from medlandmark.models import count_parameters, network_for
from medlandmark.planning import plan_dataset
from medlandmark.records.plan import Plan
from medlandmark.records.run import RunRecord, write_run_record
from medlandmark.records.weights import save_weights

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def random_runs(dataset: Path, plan: Plan, arch: str, out: Path) -> dict[str, int]:
    """A run folder per configuration of the cascade (or the single one), random weights."""
    first = plan.configuration()
    names = [first.name] + ([first.next_stage] if first.next_stage else [])
    sizes = {}
    for name in names:
        config = plan.configurations[name]
        torch.manual_seed(0)
        chosen = arch if arch in config.architectures else "unet"
        network = network_for(chosen, config, len(plan.landmarks), len(plan.modalities))
        run = out / name
        run.mkdir(parents=True)
        save_weights(run / "model_best.safetensors", network)
        # threshold 0: every landmark counts as present, so the fine stage refines all of them, as
        # it does for a trained model (random weights would leave most below the usual threshold)
        record = RunRecord(
            arch=chosen,
            configuration=name,
            plan=plan,
            landmarks=plan.landmarks,
            spacing_mm=[0.1, 0.1] if plan.spatial_dims == 2 else None,
            presence_threshold=0.0,
        )
        write_run_record(run, record)
        sizes[name] = count_parameters(network)
    return sizes


def time_predictions(models: Path, images: list[Path], device: str, spacing) -> list[float]:
    predictor = Predictor.from_run(models, device=device)
    predictor.predict(read_image(images[0], spacing_xy_mm=spacing))  # warm-up
    seconds = []
    for path in images:
        image = read_image(path, spacing_xy_mm=spacing)
        start = time.perf_counter()
        predictor.predict(image)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu-memory", type=float, default=2.0, help="planning budget in GB")
    parser.add_argument("--arch", default="unet", choices=["unet", "hyatt", "h3de"])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medlandmark-predict-"))
    results = {
        "meta": {
            "device": args.device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "gpu_memory_gb": args.gpu_memory,
        }
    }
    try:
        isbi = convert_isbi2015(DATA / "isbi2015", work / "isbi")
        plan = plan_dataset(isbi, gpu_memory_gb=args.gpu_memory)
        sizes = random_runs(isbi, plan, args.arch, work / "isbi_models")
        images = [isbi / "images" / f"{i}.jpg" for i in range(151, 151 + args.images)]
        seconds = time_predictions(work / "isbi_models", images, args.device, [0.1, 0.1])
        results["isbi2015"] = {
            "configurations": {n: plan.configurations[n].patch_size for n in sizes},
            "parameters": sizes,
            "seconds_per_image": seconds,
            "mean_s": sum(seconds) / len(seconds),
        }
        afids_dir = DATA / "afids_mni152"
        afids = convert_afids(
            afids_dir / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz",
            afids_dir / "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv",
            work / "afids",
        )
        plan = plan_dataset(afids, gpu_memory_gb=args.gpu_memory)
        arch = "h3de" if args.arch == "h3de" else "unet"
        sizes = random_runs(afids, plan, arch, work / "afids_models")
        volumes = [next((afids / "images").iterdir())] * max(1, min(args.images, 2))
        seconds = time_predictions(work / "afids_models", volumes, args.device, None)
        results["afids"] = {
            "configurations": {n: plan.configurations[n].patch_size for n in sizes},
            "parameters": sizes,
            "seconds_per_volume": seconds,
            "mean_s": sum(seconds) / len(seconds),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
