"""Progress everywhere: a live bar with counts and rates on a terminal, a few plain lines in CI
logs, nothing with --quiet; every verb takes --quiet and --verbose."""

from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console

from medlandmark import console as console_module
from medlandmark.cli import build_parser, main
from medlandmark.datasets.synthetic import make_synthetic_dataset

ANSI = re.compile(r"\x1b\[")


@pytest.fixture
def captured(monkeypatch):
    """Swap the package's console for one writing into a buffer; returns a factory."""

    def install(terminal: bool) -> io.StringIO:
        buffer = io.StringIO()
        fake = Console(
            file=buffer, force_terminal=terminal, width=100, highlight=False, soft_wrap=True
        )
        monkeypatch.setattr(console_module, "console", fake)
        return buffer

    yield install
    console_module.configure()


def _slow(n: int, seconds: float):
    for i in range(n):
        time.sleep(seconds)
        yield i


def test_terminal_shows_a_bar_with_count_and_rate(captured):
    buffer = captured(terminal=True)
    assert list(
        console_module.progress(_slow(5, 0.01), total=5, description="checking cases")
    ) == list(range(5))
    text = buffer.getvalue()
    assert ANSI.search(text), "a live bar redraws with terminal control codes"
    assert "checking cases" in text and "5/5" in text and "/s" in text


def test_logs_get_few_plain_lines_with_count_and_rate(captured, monkeypatch):
    buffer = captured(terminal=False)
    monkeypatch.setattr(console_module, "LOG_INTERVAL_S", 0.0)
    list(console_module.progress(range(1000), description="preprocess data_fullres"))
    lines = buffer.getvalue().splitlines()
    assert not ANSI.search(buffer.getvalue())
    assert 2 <= len(lines) <= 11, lines  # a line per tenth at most, and the last
    assert re.fullmatch(r"preprocess data_fullres: 1000/1000 \(\d+(\.\d)?/s\)", lines[-1])


def test_logs_are_throttled_in_time(captured):
    buffer = captured(terminal=False)
    list(console_module.progress(range(1000), description="predicting"))
    assert buffer.getvalue().splitlines() == [buffer.getvalue().splitlines()[-1]]
    assert "1000/1000" in buffer.getvalue()


def test_training_bar_shows_live_fields(captured):
    buffer = captured(terminal=False)
    with console_module.ProgressBar(3, "train unet 2d") as bar:
        for _ in range(3):
            bar.update(loss=0.123456, samples_per_s=42.0)
    assert "train unet 2d: 3/3  loss 0.1235  samples_per_s 42" in buffer.getvalue()


def test_quiet_prints_nothing_but_warnings(captured):
    buffer = captured(terminal=True)
    console_module.configure(quiet=True)
    list(console_module.progress(range(10), description="quiet"))
    with console_module.ProgressBar(2, "quiet bar") as bar:
        bar.update()
    console_module.info("an info line")
    assert buffer.getvalue() == ""
    console_module.warn("a warning")
    assert "a warning" in buffer.getvalue()


def test_check_through_the_cli_in_a_log_is_plain_and_quiet_is_silent(captured, tmp_path):
    root = make_synthetic_dataset(tmp_path / "synth", num_cases=4, size_px=32)
    buffer = captured(terminal=False)
    assert main(["check", str(root)]) == 0
    assert "checking cases: 4/4" in buffer.getvalue() and not ANSI.search(buffer.getvalue())
    buffer = captured(terminal=False)
    assert main(["check", str(root), "--quiet"]) == 0
    assert buffer.getvalue() == "checked 4 cases: 0 errors, 0 warnings\n"  # the verdict only


def _verbs() -> list[list[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    verbs = []
    for name, verb in sub.choices.items():
        kinds = [a for a in verb._actions if a.dest == "kind"]
        verbs += [[name, kind] for kind in kinds[0].choices] if kinds else [[name]]
    return verbs


@pytest.mark.parametrize("verb", _verbs(), ids=" ".join)
def test_every_verb_takes_quiet_and_verbose(verb):
    help_text = (
        next(a for a in build_parser()._actions if a.dest == "verb").choices[verb[0]].format_help()
    )
    if len(verb) == 2:
        kinds = next(a for a in build_parser()._actions if a.dest == "verb").choices[verb[0]]
        help_text = (
            next(a for a in kinds._actions if a.dest == "kind").choices[verb[1]].format_help()
        )
    assert "--quiet" in help_text and "--verbose" in help_text
