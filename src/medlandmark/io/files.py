"""File naming and atomic writes: a file either appears whole under its name or not at all."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

COMPOUND_SUFFIXES = (".nii.gz", ".mrk.json", ".seg.nrrd")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file: colleagues may read outputs


def full_suffix(path: str | Path) -> str:
    """The format suffix of a file, lower-case, compound ones kept whole (``.nii.gz``)."""
    name = Path(path).name.lower()
    for suffix in COMPOUND_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def stem(path: str | Path) -> str:
    """The file name without its (possibly compound) format suffix."""
    name = Path(path).name
    suffix = full_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same suffix; rename it into place on success.

    On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    make_parent_folder(path)
    with _errors_naming(path):
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{stem(path)}.partial-", suffix=full_suffix(path), dir=path.parent
        )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, FILE_MODE)  # mkstemp makes it private (0600)
        with _errors_naming(path):
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def make_parent_folder(path: str | Path) -> None:
    """Create ``path``'s folder (and its parents); an OSError naming the first of them that
    exists as a file, or the folder that cannot be made, never a temporary name."""
    parent = Path(path).parent
    for folder in (parent, *parent.parents):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(folder))
        if folder.is_dir():
            break
    with _errors_naming(parent):
        parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _errors_naming(path: Path):
    """An OSError of the block (a temporary file refused in a read-only folder...) re-raised
    naming ``path`` and saying it cannot be written there."""
    try:
        yield
    except OSError as error:
        reason = f"cannot write here ({error.strerror or error})"
        raise type(error)(error.errno, reason, str(path)) from None


def remove_partials(path: str | Path) -> int:
    """Delete what killed atomic writes of ``path`` left beside it (hidden ``.partial-`` files or
    folders, never read as data); returns how many. Call only where nothing writes ``path`` now."""
    path = Path(path)
    removed = 0
    for leftover in path.parent.glob(f".{glob.escape(stem(path))}.partial-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name.endswith(full_suffix(path)):
            leftover.unlink(missing_ok=True)
        else:
            continue
        removed += 1
    return removed


@contextlib.contextmanager
def atomic_directory_write(path: str | Path) -> Iterator[Path]:
    """Yield ``tmpdir/<name>`` for writers that make several files named after ``path``.

    MetaImage ``.mhd`` headers name their ``.raw`` file, so the files are written under their
    final names in a temporary folder beside ``path`` and moved in, the header last.
    """
    path = Path(path)
    make_parent_folder(path)
    with _errors_naming(path):
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{stem(path)}.partial-", dir=path.parent))
    try:
        yield tmp_dir / path.name
        written = sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name)
        for item in written:
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
