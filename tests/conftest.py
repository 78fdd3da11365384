"""Shared fixtures: the real public data under ../shared/data (skipped cleanly when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

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
    from medlandmark.planning import plan_dataset

    root = tmp_path_factory.mktemp("real")
    afids = shared_path("afids_mni152")
    roots = {
        "isbi2015": convert_isbi2015(shared_path("isbi2015"), root / "isbi2015"),
        "hand_xray": convert_hand_xray(shared_path("hand_xray"), root / "hand_xray"),
        "afids": convert_afids(
            afids / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz",
            afids / "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv", root / "afids",
        ),
    }  # fmt: skip
    for dataset in roots.values():
        plan_dataset(dataset)
    return roots
