"""Shared fixtures: the real public data under ../shared/data (skipped cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from medlandmark.datasets.dataset import DatasetSpec, write_spec
from medlandmark.planning import plan_dataset
from medlandmark.planning.planner import training_defaults
from medlandmark.preprocessing import preprocess_dataset
from medlandmark.records.plan import Configuration, Normalization, Plan, load_plan, write_plan

SMALL_FEATURES = 8

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per test process (and per process it starts): oversubscribing the cores with
    # torch's spinning worker threads makes CPU tests many times slower
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("default")


def shared_path(relative: str) -> Path:
    """A path under ../shared/data, or skip the test with a message saying what is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"../shared/data/{relative} not found: real-data test skipped")
    return path


@pytest.fixture
def shared_data() -> Path:
    """The ../shared/data folder (skips the test when it is absent)."""
    return shared_path("")


@pytest.fixture(scope="session")
def real_datasets(tmp_path_factory) -> dict[str, Path]:
    """ISBI 2015, hand X-ray and AFIDs converted from ../shared/data and planned (8 GB budget)."""
    from medlandmark.datasets.converters import convert_afids, convert_hand_xray, convert_isbi2015

    root = tmp_path_factory.mktemp("real")
    afids = shared_path("afids_mni152")
    roots = {
        "isbi2015": convert_isbi2015(shared_path("isbi2015"), root / "isbi2015"),
        "hand_xray": convert_hand_xray(shared_path("hand_xray"), root / "hand_xray"),
        "afids": convert_afids(
            afids / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz",
            afids / "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv",
            root / "afids",
        ),
    }
    for dataset in roots.values():
        plan_dataset(dataset)
    return roots


def shrink_networks(dataset: Path, base: int = SMALL_FEATURES) -> None:
    """Narrow the plan's U-Net so that CPU tests run in seconds (sizes otherwise unchanged)."""
    folder = dataset / "preprocessed"
    plan = load_plan(folder)
    for config in plan.configurations.values():
        unet = config.architectures["unet"]
        unet["features_per_stage"] = [
            min(base * 2**i, 64) for i in range(len(unet["features_per_stage"]))
        ]
    write_plan(folder, plan)


def single_configuration_plan(
    arch: str, sizes: dict, patch_size: list[int], landmarks: list[str], channels: int = 1
) -> Plan:
    """A complete plan with one configuration ``fine`` at 1 mm whose ``arch`` has ``sizes``."""
    ndim = len(patch_size)
    configuration = Configuration(
        name="fine",
        stage="full",
        data_identifier="data_fullres",
        spacing_mm=[1.0] * ndim,
        patch_size=patch_size,
        batch_size=2,
        heatmap_sigma_mm=2.0,
        heatmap_sigma_voxels=[2.0] * ndim,
        architectures={arch: sizes},
    )
    return Plan(
        dataset="test",
        spatial_dims=ndim,
        landmarks=landmarks,
        modalities=[f"m{i}" for i in range(channels)],
        transpose_forward=list(range(ndim)),
        transpose_backward=list(range(ndim)),
        target_spacing_mm=[1.0] * ndim,
        median_shape_at_target=[float(p) for p in patch_size],
        normalization=[Normalization(scheme="zscore_per_image")] * channels,
        default_configuration="fine",
        configurations={"fine": configuration},
        training=training_defaults(),
    )


@pytest.fixture(scope="session")
def small_isbi(tmp_path_factory) -> Path:
    """Six real ISBI 2015 images (symlinked), planned at a 1 GB budget: a cascade."""
    from medlandmark.datasets.converters import ISBI_LANDMARKS

    source = shared_path("isbi2015")
    root = tmp_path_factory.mktemp("isbi") / "isbi_small"
    (root / "images").mkdir(parents=True)
    (root / "landmarks").mkdir()
    case_ids = [f"{i:03d}" for i in range(1, 7)]
    for case_id in case_ids:
        os.symlink(
            source / "RawImage" / "TrainingData" / f"{case_id}.jpg",
            root / "images" / f"{case_id}.jpg",
        )
        os.symlink(
            source / "AnnotationsByMD" / "400_senior" / f"{case_id}.txt",
            root / "landmarks" / f"{case_id}.txt",
        )
    write_spec(
        root,
        DatasetSpec(
            name="isbi-small",
            spatial_dims=2,
            landmarks=ISBI_LANDMARKS,
            modalities=["xray"],
            spacing_mm=[0.1, 0.1],
            splits={"train": case_ids},
        ),
    )
    plan = plan_dataset(root, gpu_memory_gb=1.0)
    assert plan.configuration().stage == "coarse"  # a cascade at 1 GB
    shrink_networks(root)
    preprocess_dataset(root, workers=2)
    return root


def synthetic_training_set(folder: Path, num_cases: int, size_px: int) -> Path:
    """A synthetic 2D dataset, planned (2 GB budget), with narrow networks, preprocessed."""
    from medlandmark.datasets.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(folder, num_cases=num_cases, size_px=size_px, spacing_mm=1.0)
    plan_dataset(root, gpu_memory_gb=2.0)
    shrink_networks(root)
    preprocess_dataset(root, workers=1)
    return root
