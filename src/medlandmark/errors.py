"""The project's own error types: every message names the file and what is wrong with it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


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


def listed(items: Sequence[object], limit: int = 8) -> str:
    """``items`` joined by commas, the first ``limit`` only: "a, b, c and 39 990 more"."""
    shown = ", ".join(str(item) for item in items[:limit])
    rest = len(items) - limit
    return (
        f"{shown} and {rest:,} more".replace(f"{rest:,}", f"{rest:,}".replace(",", " "))
        if rest > 0
        else shown
    )


def validation_problems(error: ValidationError, top_level: str, limit: int | None = None) -> str:
    """A pydantic validation error as ``where: what`` parts joined by "; " (the first ``limit``
    of them), ``top_level`` naming a problem with the whole object."""
    return "; ".join(
        f"{'.'.join(str(p) for p in item['loc']) or top_level}: {item['msg']}{_quoted_number(item)}"
        for item in error.errors()[:limit]
    )


def _quoted_number(item: dict) -> str:
    """A hint when a number was written as text (``"2"`` instead of ``2``), which pydantic
    refuses in a field of fixed values without saying why."""
    value = item.get("input")
    if not isinstance(value, str) or item.get("type") not in NUMBER_ERRORS:
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return f' (got the text "{value}": write the number without quotes)'


NUMBER_ERRORS = {"literal_error", "int_type", "float_type", "bool_type"}
