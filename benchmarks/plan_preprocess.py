"""Time `plan` + `preprocess` on the 300 ISBI 2015 images (target: under 5 minutes on 2 cores).

python benchmarks/plan_preprocess.py [--src ../shared/data/isbi2015] [--work DIR] [--workers 2]
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

from medlandmark.datasets.converters import convert_isbi2015
from medlandmark.planning import plan_dataset
from medlandmark.preprocessing import preprocess_dataset

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data" / "isbi2015")
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: a temporary one)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpu-memory", type=float, default=8.0)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="medlandmark-bench-"))
    dataset = work / "isbi2015"
    shutil.rmtree(dataset, ignore_errors=True)
    start = time.perf_counter()
    convert_isbi2015(args.src, dataset)
    converted = time.perf_counter()
    plan = plan_dataset(dataset, gpu_memory_gb=args.gpu_memory, workers=args.workers)
    planned = time.perf_counter()
    counts = preprocess_dataset(dataset, workers=args.workers)
    done = time.perf_counter()
    cache_bytes = sum(
        p.stat().st_size for p in (dataset / "preprocessed").rglob("*") if p.is_file()
    )
    result = {
        "cases": sum(c["done"] + c["skipped"] for c in counts.values()) // len(counts),
        "configurations": list(plan.configurations),
        "cache_folders": counts,
        "convert_s": round(converted - start, 1),
        "plan_s": round(planned - converted, 1),
        "preprocess_s": round(done - planned, 1),
        "plan_plus_preprocess_s": round(done - converted, 1),
        "cache_gb": round(cache_bytes / 1024**3, 2),
        "workers": args.workers,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    print(json.dumps(result, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
