"""Dataset format (dataset.json + images/ + landmarks/), validation, converters, synthetic data."""

from medlandmark.datasets.dataset import (
    Case,
    Dataset,
    DatasetSpec,
    Problem,
    discover_cases,
    load_spec,
)

__all__ = ["Case", "Dataset", "DatasetSpec", "Problem", "discover_cases", "load_spec"]
