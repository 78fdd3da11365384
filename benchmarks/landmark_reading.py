"""How long reading a landmark file takes as its rows grow (issue 18: it was quadratic).

Writes CSV landmark files of 10k, 40k and 100k rows, once with names the dataset does not know
and once with every name given twice (the case that was quadratic: each repeat was counted
through the whole list), reads each with ``read_landmarks`` and selects the dataset's landmarks
from it, as ``check``, ``plan`` and ``preprocess`` do. Target: 100k rows in under a second. Run
it alone.

    .venv/bin/python benchmarks/landmark_reading.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from medlandmark.errors import LandmarkFileError
from medlandmark.io.landmarks import read_landmarks

ROWS = (10_000, 40_000, 100_000)


def read_and_select_seconds(path: Path, repeats: int = 3) -> tuple[float, int]:
    """Median seconds to read ``path`` and select two known names; the error message's length."""
    times, message = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        try:
            read_landmarks(path).select(["nasion", "sella"], path)
        except LandmarkFileError as error:
            message = str(error)
        times.append(time.perf_counter() - started)
    return statistics.median(times), len(message)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        for rows in ROWS:
            for kind, names in (("unknown names", rows), ("every name twice", rows // 2)):
                path = Path(folder) / f"rows{rows}.csv"
                lines = "".join(f"p{i % names},{i % 97}.5,{i % 89}.25\n" for i in range(rows))
                path.write_text("# coordinate_space: LPS\nname,x,y\n" + lines)
                seconds, chars = read_and_select_seconds(path)
                print(f"{rows:>7} rows, {kind:<16}: {seconds:.3f} s (error: {chars} characters)")


if __name__ == "__main__":
    main()
