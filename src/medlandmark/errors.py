"""The project's own error types: every message names the file and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class MedlandmarkError(Exception):
    """Base class for errors reported to the user as one clear line (no traceback)."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.detail = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class ImageError(MedlandmarkError):
    """An image that cannot be read, written or used (truncated, NaN, bad geometry...)."""


class LandmarkFileError(MedlandmarkError):
    """A landmark file that cannot be parsed or does not match what it should hold."""


class DatasetError(MedlandmarkError):
    """A dataset folder or dataset.json that is malformed or inconsistent."""
