"""Augmented samples per second: medlandmark.augment vs a MONAI pipeline, affine + elastic, CPU.

Both pipelines turn a source crop into a randomly rotated, zoomed and elastically deformed patch
(every transform applied to every sample), at patch sizes taken from the golden plans:

    2D  crop 1216 x 1024 -> patch 960 x 768   (ISBI 2015 "2d_fine"), batch 4
    3D  crop 128^3       -> patch 96^3        (AFIDs-like), batch 2

ours:  ``augment_batch`` on the whole batch (one resampling; also moves 19 landmarks per sample);
monai: per sample, as in a MONAI data loader, with metadata tracking off (MONAI's fastest mode):
       "two_step" = RandAffined + Rand2DElasticd / Rand3DElasticd (two resamplings);
       "fused"    = Rand2DElasticd / Rand3DElasticd with the rotation and zoom built in.
MONAI moves no landmark through an elastic deformation; its timing covers images only.

MONAI is not a dependency of medlandmark: install it into a separate virtual environment (only
``monai`` itself is added to numpy and torch; pin torch to the build you already have)::

    python3 -m venv /tmp/monai-venv
    /tmp/monai-venv/bin/pip install torch==2.13.0 && /tmp/monai-venv/bin/pip install monai

then, from the repository root::

    .venv/bin/python benchmarks/augment.py --monai-python /tmp/monai-venv/bin/python --json

runs ours here and MONAI in that environment (this file imports nothing from medlandmark when
``--backend monai``), and prints the speed-ups. ``--backend ours`` / ``--backend monai`` run one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

CASES = {
    "2d": {"crop": (1216, 1024), "patch": (960, 768), "batch": 4},
    "3d": {"crop": (128, 128, 128), "patch": (96, 96, 96), "batch": 2},
}
LANDMARKS = 19
ROTATION_DEG = {"2d": 30.0, "3d": 15.0}
ZOOM = (0.7, 1.4)
ELASTIC_MAGNITUDE_VOXELS = (1.0, 6.0)
ELASTIC_SPACING_VOXELS = 32.0
# MONAI's 3D elastic smooths a dense random field: sigma and magnitude of its documented example
MONAI_3D_SIGMA = (5.0, 8.0)
MONAI_3D_MAGNITUDE = (100.0, 200.0)


def time_per_batch(step, repeats: int) -> float:
    """Median seconds of ``step()`` over ``repeats`` runs, after one warm-up run."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_ours(name: str, repeats: int, seed: int) -> dict:
    from medlandmark.augment import AugmentConfig, augment_batch

    case = CASES[name]
    ndim = len(case["crop"])
    images = torch.randn(
        case["batch"], 1, *case["crop"], generator=torch.Generator().manual_seed(seed)
    )
    points = torch.rand(case["batch"], LANDMARKS, ndim) * (torch.tensor(case["crop"]) - 1)
    config = AugmentConfig.identity(
        p_rotation=1.0,
        rotation_2d_deg=ROTATION_DEG["2d"],
        rotation_3d_deg=(ROTATION_DEG["3d"],) * 3,
        p_scale=1.0,
        scale=ZOOM,
        p_elastic=1.0,
        elastic_magnitude_voxels=ELASTIC_MAGNITUDE_VOXELS,
        elastic_spacing_voxels=ELASTIC_SPACING_VOXELS,
    )
    generator = torch.Generator().manual_seed(seed)
    seconds = time_per_batch(
        lambda: augment_batch(images, points, case["patch"], config, generator), repeats
    )
    return {"samples_per_s": case["batch"] / seconds, "batch": case["batch"]}


def monai_pipelines(name: str) -> dict:
    from monai.transforms import Compose, Rand2DElasticd, Rand3DElasticd, RandAffined

    case = CASES[name]
    ndim = len(case["crop"])
    angle = math.radians(ROTATION_DEG[name])
    rotate = (angle,) if ndim == 2 else (angle,) * 3
    scale = ((ZOOM[0] - 1, ZOOM[1] - 1),) * ndim  # MONAI: factor = 1 + uniform(low, high)
    common = {"keys": "image", "prob": 1.0, "mode": "bilinear", "padding_mode": "zeros"}
    if ndim == 2:
        elastic = {
            "spacing": (ELASTIC_SPACING_VOXELS,) * 2,
            "magnitude_range": ELASTIC_MAGNITUDE_VOXELS,
        }
        elastic_type = Rand2DElasticd
    else:
        elastic = {"sigma_range": MONAI_3D_SIGMA, "magnitude_range": MONAI_3D_MAGNITUDE}
        elastic_type = Rand3DElasticd
    two_step = Compose(
        [
            RandAffined(
                spatial_size=case["patch"], rotate_range=rotate, scale_range=scale, **common
            ),
            elastic_type(**elastic, **common),
        ]
    )
    fused = Compose(
        [
            elastic_type(
                spatial_size=case["patch"],
                rotate_range=rotate,
                scale_range=scale,
                **elastic,
                **common,
            )
        ]
    )
    return {"two_step": two_step, "fused": fused}


def bench_monai(name: str, repeats: int, seed: int) -> dict:
    import monai
    from monai.data import set_track_meta

    set_track_meta(False)
    case = CASES[name]
    crops = torch.randn(
        case["batch"], 1, *case["crop"], generator=torch.Generator().manual_seed(seed)
    )
    result = {"batch": case["batch"], "monai_version": monai.__version__}
    for variant, pipeline in monai_pipelines(name).items():
        pipeline.set_random_state(seed)

        def step(pipeline=pipeline):
            return [pipeline({"image": crop})["image"] for crop in crops]

        result[f"{variant}_samples_per_s"] = case["batch"] / time_per_batch(step, repeats)
    return result


def run_backend(backend: str, cases: list[str], repeats: int, seed: int) -> dict:
    bench = bench_ours if backend == "ours" else bench_monai
    return {name: bench(name, repeats, seed) for name in cases}


def monai_in(python: str, args: argparse.Namespace) -> dict:
    """The MONAI results from another interpreter (a virtual environment that has MONAI)."""
    command = [
        python,
        os.path.abspath(__file__),
        "--backend",
        "monai",
        "--json",
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--cases",
        *args.cases,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"MONAI run with {python} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout)["monai"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("both", "ours", "monai"), default="both")
    parser.add_argument(
        "--monai-python",
        default="/tmp/monai-venv/bin/python",
        help="interpreter with MONAI installed, for --backend both",
    )
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed batches per measurement (median)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {
        "cases": {
            name: {k: list(v) if isinstance(v, tuple) else v for k, v in CASES[name].items()}
            for name in args.cases
        },
        "threads": args.threads,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    if args.backend in ("both", "ours"):
        result["ours"] = run_backend("ours", args.cases, args.repeats, args.seed)
    if args.backend == "monai":
        result["monai"] = run_backend("monai", args.cases, args.repeats, args.seed)
    elif args.backend == "both":
        result["monai"] = monai_in(args.monai_python, args)
        result["speedup"] = {
            name: {
                variant: round(
                    result["ours"][name]["samples_per_s"]
                    / result["monai"][name][f"{variant}_samples_per_s"],
                    2,
                )
                for variant in ("two_step", "fused")
            }
            for name in args.cases
        }
    if args.json:
        print(json.dumps(result))
        return
    for backend in ("ours", "monai"):
        for name, numbers in result.get(backend, {}).items():
            rates = ", ".join(
                f"{k} {v:.1f}" for k, v in numbers.items() if k.endswith("samples_per_s")
            )
            print(f"{backend:5s} {name}: {rates} samples/s (batch {numbers['batch']})")
    for name, ratios in result.get("speedup", {}).items():
        print(f"speed-up {name}: " + ", ".join(f"{k} x{v}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
