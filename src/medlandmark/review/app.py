"""The review web app: a small JSON API over a :class:`ReviewSession` and the editor's page.

Every request names a case by its id, looked up among the session's cases (never joined to a
path), and static files by name from a fixed list, so no request reaches outside the folders the
session was given.
"""

from __future__ import annotations

import ipaddress
import math
import webbrowser
from importlib import resources

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medlandmark.console import info, warn
from medlandmark.errors import MedlandmarkError
from medlandmark.review.render import (
    PLANES,
    default_window,
    image_png,
    image_view,
    slice_png,
    slice_view,
)
from medlandmark.review.session import ConflictError, ReviewSession, UnknownCaseError

STATIC_FILES = {  # name -> media type: everything the page loads
    "index.html": "text/html; charset=utf-8",
    "review.js": "text/javascript; charset=utf-8",
    "review.css": "text/css; charset=utf-8",
}
NO_STORE = {"Cache-Control": "no-store"}


def create_app(session: ReviewSession) -> Starlette:
    """The Starlette application serving ``session``."""

    def page(request: Request) -> Response:
        return _static("index.html")

    def static(request: Request) -> Response:
        return _static(request.path_params["name"])

    def cases(request: Request) -> Response:
        listed = session.cases()
        return JSONResponse({"cases": [c.to_dict() for c in listed]}, headers=NO_STORE)

    def case(request: Request) -> Response:
        return _answer(lambda: case_payload(session, request.path_params["case_id"]))

    def picture(request: Request) -> Response:
        case_id = request.path_params["case_id"]
        return _answer(lambda: _picture(session, case_id, request.query_params), png=True)

    def slices(request: Request) -> Response:
        case_id = request.path_params["case_id"]
        return _answer(lambda: _slices(session, case_id, request.query_params))

    async def save(request: Request) -> Response:
        case_id = request.path_params["case_id"]
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        return _answer(
            lambda: {
                "version": session.save(
                    case_id, body.get("points_mm", []), str(body.get("version", ""))
                )
            }
        )

    routes = [
        Route("/", page),
        Route("/static/{name}", static),
        Route("/api/cases", cases),
        Route("/api/cases/{case_id}", case),
        Route("/api/cases/{case_id}/picture.png", picture),
        Route("/api/cases/{case_id}/slices", slices),
        Route("/api/cases/{case_id}/landmarks", save, methods=["PUT"]),
    ]
    return Starlette(routes=routes)


def case_payload(session: ReviewSession, case_id: str) -> dict:
    """What the editor needs to show a case: its landmarks (world mm; None where missing),
    their confidences and error bounds, the verdict, the version, and how to draw the image."""
    case, current = session.case(case_id), session.landmarks(case_id)
    landmarks, image = current.landmarks, session.image(case_id)
    recorded = landmarks.recorded_mm
    return {
        **case.to_dict(),
        "ndim": image.ndim,
        "names": landmarks.names,
        "points_mm": _rows(landmarks.points_mm),
        "recorded_mm": None if recorded is None else _rows(recorded),
        "confidence": _values(landmarks.confidence),
        "error_bound_mm": _values(landmarks.error_bound_mm),
        "version": current.version,
        "corrected": current.corrected,
        "window": list(default_window(image)),
        "spacing_mm": list(image.geometry.spacing_mm),
        "view": image_view(image.geometry).to_dict() if image.ndim == 2 else None,
        "centre_mm": _centre(image.geometry),
    }


def serve(
    session: ReviewSession,
    host: str = "127.0.0.1",
    port: int = 8765,
    allow_remote: bool = False,
    open_browser: bool = True,
) -> None:
    """Run the app until interrupted; a host other than loopback needs ``allow_remote``."""
    import uvicorn

    if not _is_loopback(host):
        if not allow_remote:
            raise MedlandmarkError(
                f"--host {host} would let other machines see these images and change the "
                "landmarks: add --allow-remote if that is what you want"
            )
        warn(f"listening on {host}: anyone who can reach this machine can view and edit")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    info(f"reviewing {len(session.cases())} cases at {url} (Ctrl+C to stop)")
    if open_browser:
        webbrowser.open(url)
    uvicorn.run(create_app(session), host=host, port=port, log_level="warning")


def _picture(session: ReviewSession, case_id: str, query) -> Response:
    image = session.image(case_id)
    window = _window(query, image)
    if image.ndim == 2:
        return Response(image_png(image, window), media_type="image/png", headers=NO_STORE)
    view = slice_view(image.geometry, query.get("plane", ""), _point(query, 3))
    return Response(slice_png(image, view, window), media_type="image/png", headers=NO_STORE)


def _slices(session: ReviewSession, case_id: str, query) -> dict:
    """The three world-aligned planes through ``point`` (x,y,z mm) of a volume."""
    image = session.image(case_id)
    if image.ndim != 3:
        raise MedlandmarkError("slices are for 3D images")
    point = _point(query, 3)
    return {plane: slice_view(image.geometry, plane, point).to_dict() for plane in PLANES}


def _answer(make, png: bool = False) -> Response:
    """``make()`` as JSON (or its response), errors as JSON with the fitting status code."""
    try:
        result = make()
    except UnknownCaseError as error:
        return JSONResponse({"error": str(error)}, status_code=404)
    except ConflictError as error:
        return JSONResponse({"error": str(error)}, status_code=409)
    except MedlandmarkError as error:
        return JSONResponse({"error": str(error)}, status_code=400)
    return result if png else JSONResponse(result, headers=NO_STORE)


def _static(name: str) -> Response:
    if name not in STATIC_FILES:
        return JSONResponse({"error": "not found"}, status_code=404)
    data = resources.files("medlandmark.review").joinpath("static", name).read_bytes()
    return Response(data, media_type=STATIC_FILES[name], headers=NO_STORE)


def _window(query, image) -> tuple[float, float]:
    if "low" in query and "high" in query:
        low, high = _number(query["low"]), _number(query["high"])
        return (low, high if high > low else low + 1e-6)
    return default_window(image)


def _point(query, ndim: int) -> np.ndarray:
    text = query.get("point", "")
    parts = text.split(",")
    if len(parts) != ndim:
        raise MedlandmarkError(f"point must be {ndim} comma-separated millimetres, got '{text}'")
    return np.array([_number(p) for p in parts])


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MedlandmarkError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise MedlandmarkError(f"'{text}' is not a finite number")
    return value


def _rows(points: np.ndarray) -> list[list[float] | None]:
    return [None if not np.isfinite(p).all() else [float(v) for v in p] for p in points]


def _values(values) -> list[float | None] | None:
    if values is None:
        return None
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def _centre(geometry) -> list[float]:
    middle = (np.asarray(geometry.shape, dtype=np.float64) - 1) / 2
    return (np.asarray(geometry.origin_mm) + geometry.index_to_world_matrix @ middle).tolist()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
