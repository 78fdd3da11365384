"""ISBI 2015 cephalograms: train on 001-150 within a time budget, report test1 (151-300) and
test2 (301-400, when the source has RawImage/Test2Data). Ground truth: the mean of the senior and
junior annotators. Prints MRE, SD and SDR at 2 / 2.5 / 3 / 4 mm per test split; the numbers also
go to WORK/<run>/results.json (paste them into benchmarks/RESULTS.md).

    .venv/bin/python benchmarks/isbi2015.py --budget cpu                 # 45 min of training
    .venv/bin/python benchmarks/isbi2015.py --budget gpu --arch hyatt    # 20 min on one GPU
    .venv/bin/python benchmarks/isbi2015.py --minutes 1                  # smoke test

Options: --source (default ../shared/data/isbi2015), --work (default benchmarks/work/isbi2015,
reused when run again: an interrupted benchmark resumes), --arch unet|hyatt, --minutes,
--gpu-memory / --base-features / --target-spacing (plan overrides), --device, --seed,
--threads (PyTorch CPU threads: 1 on a machine busy with other jobs), --augment NAME=VALUE
(an augmentation setting of every stage, as train --augment; named in the run folder).
"""

from __future__ import annotations

from pathlib import Path

import recipes
from recipes import SHARED_DATA, Benchmark, Budget, Target

from medlandmark.datasets.converters import ISBI_SPLIT_FOLDERS, convert_isbi2015
from medlandmark.datasets.dataset import Dataset

BUDGETS = {
    # 2 CPU cores: a narrow U-Net (width 16) planned at 0.4 mm instead of the 0.1 mm pixels, for
    # 0.9 GB: coarse stage 128x96 at 2 mm (the whole image), fine stage 64x64 patches at 0.4 mm
    # (at 0.1 mm the fine patches span 6.4 mm, less than the coarse error); lr 3e-3 and the
    # centroid loss, which removes the coarse stage's far-off peaks (RESULTS.md)
    "cpu": Budget(
        minutes=45,
        gpu_memory_gb=0.9,
        base_features=16,
        target_spacing_mm=0.4,
        shares={"coarse": 0.5, "fine": 0.5, "full": 1.0},
        batch_size={"coarse": 8, "fine": 16},
        learning_rate={"unet": 3e-3},
        loss="balanced_mse_centroid",
    ),
    # one large GPU: the cascade planned for 8 GB (coarse 1472x1216 at 0.163 mm, fine 960x768
    # patches at 0.1 mm) with larger batches; --gpu-memory 16 or more plans one full-size stage
    "gpu": Budget(
        minutes=20,
        gpu_memory_gb=8.0,
        base_features=32,
        shares={"coarse": 0.4, "fine": 0.6, "full": 1.0},
        batch_size={"coarse": 8, "fine": 16},
    ),
}
TARGETS = {
    "cpu": [Target("mre_mm", at_most=True, value=1.5)],
    "gpu": [
        Target("mre_mm", at_most=True, value=1.10),
        Target("sdr_2mm", at_most=False, value=88.0),
    ],
}


def source_splits(source: Path) -> set[str]:
    """The ISBI splits whose image folder the source has."""
    raw = source / "RawImage"
    return {
        split
        for split, folder in ISBI_SPLIT_FOLDERS.items()
        if (raw / folder).is_dir() and any((raw / folder).iterdir())
    }


def dataset_current(source: Path, out: Path) -> bool:
    """The converted dataset has every split of the source (Test2Data may be added later)."""
    return source_splits(source) <= set(Dataset(out).splits())


ISBI2015 = Benchmark(
    name="isbi2015",
    make_dataset=lambda source, out: convert_isbi2015(source, out, force=True),
    dataset_current=dataset_current,
    budgets=BUDGETS,
    targets=TARGETS,
    main_split="test1",
    archs=("unet", "hyatt"),
    default_source=SHARED_DATA / "isbi2015",
)


def main(argv: list[str] | None = None) -> dict:
    return recipes.main(ISBI2015, __doc__, argv)


if __name__ == "__main__":
    main()
