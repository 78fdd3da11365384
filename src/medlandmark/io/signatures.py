"""An image file's first bytes against its name: a JPEG named .png is named as such, not as a
file with "wrong magic bytes"."""

from __future__ import annotations

from pathlib import Path

from medlandmark.errors import ImageError
from medlandmark.io.files import full_suffix

SIGNATURES = {  # format name -> (suffixes, possible first bytes)
    "PNG": ((".png",), (b"\x89PNG\r\n\x1a\n",)),
    "JPEG": ((".jpg", ".jpeg"), (b"\xff\xd8\xff",)),
    "BMP": ((".bmp",), (b"BM",)),
    "TIFF": ((".tif", ".tiff"), (b"II*\x00", b"MM\x00*")),
}


def format_of(head: bytes) -> str | None:
    """The format whose signature ``head`` (a file's first bytes) starts with, if any."""
    for name, (_, starts) in SIGNATURES.items():
        if any(head.startswith(start) for start in starts):
            return name
    return None


def refuse_wrong_signature(path: Path) -> None:
    """An ImageError when a file named as one of :data:`SIGNATURES`' formats does not start
    like it, naming what it is when that is recognisable."""
    suffix = full_suffix(path)
    expected = next((n for n, (suffixes, _) in SIGNATURES.items() if suffix in suffixes), None)
    if expected is None:
        return
    with path.open("rb") as handle:
        head = handle.read(16)
    found = format_of(head)
    if found == expected:
        return
    if found is None:
        raise ImageError(f"not a {expected} file (its first bytes are not {expected}'s)", path)
    right = SIGNATURES[found][0][0]
    raise ImageError(
        f"the file is a {found} image but is named {suffix}: rename it to {right}", path
    )
