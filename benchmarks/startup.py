"""Start-up cost of the package: ``import medlandmark`` and ``medlandmark --help``.

Each command runs ``--repeats`` times in a fresh interpreter (the first run also warms the file
cache and is dropped); prints the median wall time, the heavy libraries each loaded and the
slowest imports by ``python -X importtime``. Run it alone: other jobs on the cores inflate it.

    .venv/bin/python benchmarks/startup.py [--repeats 11] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from host import cpu_model

HEAVY = ("torch", "matplotlib", "SimpleITK", "scipy", "numpy", "pydantic", "rich")
COMMANDS = {
    "import medlandmark": [sys.executable, "-c", "import medlandmark"],
    "medlandmark --help": [str(Path(sys.executable).parent / "medlandmark"), "--help"],
    "medlandmark train --help": [
        str(Path(sys.executable).parent / "medlandmark"),
        "train",
        "--help",
    ],
    "import torch (for scale)": [sys.executable, "-c", "import torch"],
}
LOADED = {
    "import medlandmark": "import medlandmark",
    "medlandmark --help": "from medlandmark.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
}


def wall_seconds(command: list[str], repeats: int) -> list[float]:
    """Wall time of ``command`` per run, the warm-up run dropped."""
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times[1:]


def heavy_modules(code: str) -> list[str]:
    """Which of the heavy libraries a fresh interpreter holds after ``code``."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def slowest_imports(code: str, count: int = 5) -> list[tuple[str, float]]:
    """The top-level packages with the largest cumulative import time (ms) under -X importtime."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], check=True, capture_output=True, text=True
    )
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        if not name[1:].startswith(" "):  # nested imports are indented under their importer
            rows.append((name.strip(), int(cumulative) / 1000))
    return sorted(rows, key=lambda row: -row[1])[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "repeats": args.repeats,
        "commands": {},
    }
    for name, command in COMMANDS.items():
        times = wall_seconds(command, args.repeats)
        entry = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3)}
        if name in LOADED:
            entry["heavy_modules_loaded"] = heavy_modules(LOADED[name])
            entry["slowest_imports_ms"] = slowest_imports(LOADED[name])
        results["commands"][name] = entry
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(results["machine"])
    for name, entry in results["commands"].items():
        loaded = entry.get("heavy_modules_loaded")
        extra = (
            "" if loaded is None else f"  loads: {', '.join(loaded) or 'none of the heavy ones'}"
        )
        print(f"{name:<28} median {entry['median_s']:.3f} s (min {entry['min_s']:.3f} s){extra}")


if __name__ == "__main__":
    main()
