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
