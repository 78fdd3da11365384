"""AFIDs in 3D brain MRI: 60 random warps of the MNI152 template with its 32 fiducials
(`medlandmark convert afids-synth`, seed 0; cases 0-39 train, 40-59 test, some landmarks cut
off by the field of view and so missing), trained within a time budget and evaluated on the
test split. Prints MRE, SD, SDR at 2 / 2.5 / 3 / 4 mm and the missing-landmark precision and
recall; the numbers also go to WORK/<run>/results.json (paste them into benchmarks/RESULTS.md).

    .venv/bin/python benchmarks/afids3d.py --budget cpu                 # 45 min of training
    .venv/bin/python benchmarks/afids3d.py --budget gpu --arch h3de     # 20 min on one GPU
    .venv/bin/python benchmarks/afids3d.py --minutes 1                  # smoke test

Options: --source (default ../shared/data/afids_mni152), --work (default benchmarks/work/afids3d,
reused when run again: an interrupted benchmark resumes), --arch unet|h3de, --minutes,
--gpu-memory / --base-features / --target-spacing (plan overrides), --device, --seed (training),
--threads (PyTorch CPU threads: 1 on a machine busy with other jobs), --augment NAME=VALUE
(an augmentation setting of every stage, as train --augment; named in the run folder).
"""

from __future__ import annotations

from pathlib import Path

import recipes
from recipes import SHARED_DATA, Benchmark, Budget, Target

from medlandmark.datasets.afids_synth import SynthOptions, convert_afids_synth
from medlandmark.datasets.dataset import Dataset

TEMPLATE = "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
FCSV = "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"
CASES, DATA_SEED = 60, 0
SYNTH_OPTIONS = SynthOptions()

BUDGETS = {
    # 2 CPU cores: planned at 1.5 mm instead of the 1 x 1.2 x 1 mm median, for 0.9 GB: a coarse
    # stage of 40^3 at 5.7 mm (the whole head), then 32^3 patches (48 mm) at 1.5 mm; lr 3e-3, the
    # centroid loss (RESULTS.md)
    "cpu": Budget(
        minutes=45,
        gpu_memory_gb=0.9,
        base_features=16,
        target_spacing_mm=1.5,
        shares={"coarse": 0.5, "fine": 0.5, "full": 1.0},
        batch_size={"coarse": 4, "fine": 8},
        learning_rate={"unet": 3e-3},
        loss="balanced_mse_centroid",
    ),
    # one large GPU: the cascade planned for 8 GB (coarse 128^3 at about 1.7 mm, fine 80^3 patches
    # at the 1 mm data spacing) with larger batches; --gpu-memory 16 or more plans one 3d_fullres stage
    "gpu": Budget(
        minutes=20,
        gpu_memory_gb=8.0,
        base_features=32,
        shares={"coarse": 0.4, "fine": 0.6, "full": 1.0},
        batch_size={"coarse": 4, "fine": 8},
    ),
}
TARGETS = {
    "cpu": [
        Target("mre_mm", at_most=True, value=2.5),
        Target("missing_recall", at_most=False, value=0.95),
    ],
    "gpu": [
        Target("mre_mm", at_most=True, value=1.3),
        Target("missing_recall", at_most=False, value=0.95),
    ],
}


def make_dataset(source: Path, out: Path) -> Path:
    """``CASES`` warped copies of the template (seed ``DATA_SEED``)."""
    return convert_afids_synth(
        source / TEMPLATE, source / FCSV, out, cases=CASES, seed=DATA_SEED, options=SYNTH_OPTIONS
    )


def dataset_current(source: Path, out: Path) -> bool:
    """The generated dataset has ``CASES`` cases made with ``DATA_SEED``."""
    dataset = Dataset(out)
    return len(dataset.case_ids) == CASES and f"seed {DATA_SEED}." in dataset.spec.description


AFIDS3D = Benchmark(
    name="afids3d",
    make_dataset=make_dataset,
    dataset_current=dataset_current,
    budgets=BUDGETS,
    targets=TARGETS,
    main_split="test",
    archs=("unet", "h3de"),
    default_source=SHARED_DATA / "afids_mni152",
)


def main(argv: list[str] | None = None) -> dict:
    return recipes.main(AFIDS3D, __doc__, argv)


if __name__ == "__main__":
    main()
