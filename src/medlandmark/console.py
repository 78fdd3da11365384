"""Messages and progress for long steps: a live bar on a terminal, plain lines in CI logs."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")
log = logging.getLogger("medlandmark")
console = Console(stderr=True, highlight=False, soft_wrap=True)  # paths in logs stay whole
_state = {"quiet": False, "verbose": False}
LOG_INTERVAL_S = 2.0


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Set how much the package prints (``--quiet`` / ``--verbose``)."""
    _state.update(quiet=quiet, verbose=verbose)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    # other libraries' loggers (matplotlib's debug lines) stay at warnings; only ours follows
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    log.setLevel(level)


def is_verbose() -> bool:
    return _state["verbose"]


def info(message: str) -> None:
    """A line for the user (suppressed by ``--quiet``)."""
    if not _state["quiet"]:
        console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def progress(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Yield ``items`` while showing progress: a bar with count and rate on a terminal; in a
    log (not a terminal) occasional plain lines; nothing with ``--quiet``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _state["quiet"]:
        yield from items
        return
    if console.is_terminal and not _live_display_active():
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    yield from _logged(items, total, description)


def _live_display_active() -> bool:
    """A bar is showing already (training's, around its validation): a second one nests only in
    recent rich versions, so plain lines are printed above it instead."""
    return bool(getattr(console, "_live_stack", None) or getattr(console, "_live", None))


class RateColumn(ProgressColumn):
    """Items per second, blank until rich has measured a rate."""

    def render(self, task: Task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:>6.1f}/s")


def _logged(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """Plain lines for logs: one per tenth of the way at most every few seconds, and the last."""
    start = last = time.monotonic()
    step = max(1, (total or 10) // 10)
    done = 0
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if done != total and (done % step or now - last < LOG_INTERVAL_S):
            continue
        last = now
        of = f"/{total}" if total else ""
        console.print(f"{description}: {done}{of} ({done / max(now - start, 1e-9):.1f}/s)")
    if total is None and done:
        console.print(f"{description}: {done} done")


class ProgressBar:
    """A progress bar with live fields (loss, learning rate...): rich on a terminal, a plain
    line every few seconds in logs, nothing with ``--quiet``. Use as a context manager."""

    def __init__(self, total: int, description: str, completed: int = 0):
        self.total, self.description, self.completed = total, description, completed
        self._bar: Progress | None = None
        self._last_line = time.monotonic()

    def __enter__(self) -> ProgressBar:
        if not _state["quiet"] and console.is_terminal:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(
                self.description, total=self.total, completed=self.completed, status=""
            )
        return self

    def update(self, advance: int = 1, line: bool = False, **fields: object) -> None:
        """Advance and show ``fields`` (numbers are formatted compactly); in a log, ``line``
        prints this step's line now (before what follows it, e.g. a validation)."""
        self.completed += advance
        status = "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
        )
        if self._bar is not None:
            self._bar.update(self._task, advance=advance, status=status)
        elif not _state["quiet"]:
            now = time.monotonic()
            due = now - self._last_line >= LOG_INTERVAL_S * 5 or self.completed == self.total
            if due or line:
                self._last_line = now
                console.print(f"{self.description}: {self.completed}/{self.total}  {status}")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
