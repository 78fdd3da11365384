"""medlandmark review in a real browser (Playwright driving the system Chromium): drag a landmark
by a known number of screen pixels and find the right millimetres in the saved file, mark one
missing, undo, and the same on the slices of a volume.

Screenshots go to the test's folder; with MEDLANDMARK_SCREENSHOTS=DIR also to DIR (docs/images
for docs/review.md).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medlandmark.datasets.check import check_dataset
from medlandmark.datasets.synthetic import make_synthetic_dataset
from medlandmark.io.landmarks import LandmarkSet, read_landmarks, write_landmarks
from medlandmark.review import ReviewSession, create_app

from .test_review import predictions_of, volume

TIMEOUT_MS = 20_000


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium not found (.ci/run installs it with apt-get): browser tests skipped")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def served(request) -> Iterator:
    """A function that serves a session on a free port and returns its URL; stopped after."""
    import uvicorn

    servers = []

    def serve(session: ReviewSession) -> str:
        port = free_port()
        config = uvicorn.Config(create_app(session), host="127.0.0.1", port=port, log_level="error")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("the review server did not start")
            time.sleep(0.05)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}/"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture()
def page() -> Iterator:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path))
    folder = os.environ.get("MEDLANDMARK_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / name)


def drag(page, start: dict, dx: float, dy: float) -> None:
    page.mouse.move(start["x"], start["y"])
    page.mouse.down()
    page.mouse.move(start["x"] + dx / 2, start["y"] + dy / 2, steps=4)
    page.mouse.move(start["x"] + dx, start["y"] + dy, steps=4)
    page.mouse.up()


def saved_after(page, path: Path, count: int) -> LandmarkSet:
    """The saved landmarks once the editor has reported ``count`` saves."""
    page.wait_for_function(f"window.review.state.saves >= {count}")
    assert page.inner_text("#save-state") == "saved"
    return read_landmarks(path)


def test_drag_mark_missing_and_undo_in_2d(tmp_path, served, page) -> None:
    dataset = make_synthetic_dataset(tmp_path / "ds", num_cases=5, size_px=96, spacing_mm=0.5)
    predictions = predictions_of(dataset, tmp_path / "predictions")
    out = tmp_path / "corrected"
    session = ReviewSession(predictions, dataset, out, user="browser")
    page.goto(served(session))
    page.wait_for_selector("#view-image[data-loaded]")
    assert page.inner_text("#case-title") == "case001"  # the failed case first
    before = session.landmarks("case001").landmarks.points_mm
    start = page.evaluate("window.review.screenPosition(1)")
    drag(page, start, 40, -25)
    saved = saved_after(page, out / "landmarks" / "case001.json", 1)
    millimetres_per_screen_pixel = start["pixelMm"] / start["zoom"]
    expected = before[1] + np.array([40, -25]) * millimetres_per_screen_pixel
    assert np.allclose(saved.points_mm[1], expected, atol=millimetres_per_screen_pixel)
    assert np.allclose(np.delete(saved.points_mm, 1, axis=0), np.delete(before, 1, axis=0))
    screenshot(page, tmp_path, "review-2d.png")
    page.keyboard.press("m")
    assert not saved_after(page, out / "landmarks" / "case001.json", 2).present[1]
    page.keyboard.press("Control+z")
    again = saved_after(page, out / "landmarks" / "case001.json", 3)
    assert np.allclose(again.points_mm[1], saved.points_mm[1])
    page.keyboard.press("n")
    page.wait_for_function("document.querySelector('#case-title').textContent === 'case002'")
    assert check_dataset(out).ok


def test_drag_on_a_slice_and_click_to_place_in_3d(tmp_path, served, page) -> None:
    path, geometry, bright = volume(tmp_path)
    names = ["A", "B", "C"]
    points = np.stack([bright, bright + [2.0, 0, 0], bright + [0, 0, -3.0]])
    write_landmarks(tmp_path / "predictions" / "vol.mrk.json", LandmarkSet(names, points))
    out = tmp_path / "out"
    session = ReviewSession(tmp_path / "predictions", tmp_path / "images", out, user="browser")
    page.goto(served(session))
    for plane in ("axial", "coronal", "sagittal"):
        page.wait_for_selector(f"#view-{plane}[data-loaded]")
    start = page.evaluate("window.review.screenPosition(0, 'axial')")
    drag(page, start, 30, 0)  # the axial view's columns run to the patient's left (+x)
    saved = saved_after(page, out / "landmarks" / "vol.json", 1)
    step = start["pixelMm"] / start["zoom"]
    assert np.allclose(saved.points_mm[0], points[0] + [30 * step, 0, 0], atol=step)
    screenshot(page, tmp_path, "review-3d.png")
    page.click("#landmark-list li:nth-child(3)")  # select C, then place it on the coronal view
    page.wait_for_function(
        f"window.review.state.selected === 2 && window.review.state.focus[2] === {points[2][2]}"
    )
    target = page.evaluate("window.review.screenPosition(0, 'coronal')")
    page.mouse.click(target["x"] + 20, target["y"] + 10)
    placed = saved_after(page, out / "landmarks" / "vol.json", 2)
    step = target["pixelMm"] / target["zoom"]  # columns +x, rows down (-z); y is the slice's
    expected = saved.points_mm[0] + [20 * step, 0, -10 * step]
    assert np.allclose(placed.points_mm[2], expected, atol=step)
    assert check_dataset(out).ok
