"""The web service: a drop-an-image page and a JSON API over a :class:`Predictor` or a ``Segmenter``.

Routes:
    ``GET /``             the page (``serve/static``: plain HTML + JS, no CDN, works offline).
    ``GET /healthz``      ``{"status": "ok"}``.
    ``GET /api/model``    the model card: architecture, labels, input contract, service limits.
    ``POST /api/predict`` multipart ``file`` (PNG/JPEG/TIFF, DICOM, NIfTI); query ``cam`` (default
                          true). Returns ``{"filename", "model", "label_names", "results": [{"frame",
                          "label", "probabilities", "notes", "overlay_png"}]}``, where ``overlay_png``
                          is the base64 PNG of the Grad-CAM over the model's view of the image.
                          For a segmentation model (``serve.segmenter``) each result has
                          ``{"frame", "size", "fractions", "notes", "mask_png", "overlay_png"}``:
                          per-class pixel fractions, the mask (base64 PNG, class index per pixel,
                          the image's size) and, with ``cam``, the classes coloured over the image.
    ``GET /openapi.json`` the API schema. There is no ``/docs`` or ``/redoc``: FastAPI's pages load
                          Swagger UI / ReDoc from a CDN, so offline (where this service is meant to
                          run) they were blank pages.

Limits, so one request cannot exhaust the machine: request bodies above ``max_upload_bytes`` are
refused from their ``Content-Length`` before they are read (413; no length: 411), a body must
arrive within ``body_timeout`` seconds (408, and the connection is closed: uvicorn has no body
read timeout, so stalled uploads stayed open indefinitely), images above
``max_pixels`` are refused from their header where the format allows (413), files with more than
``max_frames`` images are refused (413; reading stops at the first image over the limit, and
multi-frame GIF/TIFF files are refused from their frame count), NIfTI volumes above
``max_voxels`` are refused from their header (413), ``.npz`` archives are not accepted (415), at
most ``max_concurrent`` predictions run at once and at most ``max_queue`` wait for a slot (more:
503 with ``Retry-After``). Bad uploads get a 4xx with a message; the service keeps serving.

Concurrency: the routes are ``async``. Waiting for a prediction slot happens on the event loop
(an ``asyncio.Semaphore``), and only the model work runs in AnyIO's worker threads, so queued
requests hold no thread and ``/healthz`` answers while the model is busy.

Run it with ``openmednet serve MODEL`` (binds 127.0.0.1 by default).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from openmednet.data.readers import NoReaderError, SkipImage
from openmednet.serve.predictor import Predictor, TooManyImagesError

if TYPE_CHECKING:
    from openmednet.serve.segmenter import Segmenter

__all__ = [
    "DEFAULT_BODY_TIMEOUT", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_QUEUE", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MAX_VOXELS",
    "create_app",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # a large uncompressed DICOM radiograph is ~20-30 MB
DEFAULT_MAX_PIXELS = 4096 * 4096  # full-field mammograms are ~4k x 5k: downsample those first
DEFAULT_MAX_FRAMES = 64
# NIfTI volumes are scaled whole as float32 (and float64 temporaries): 512 x 512 x 128 voxels is a
# 128-slice CT at full resolution, ~1 GB of working memory. max_pixels * max_frames (1G voxels at
# the defaults) would allow tens of GB.
DEFAULT_MAX_VOXELS = 512 * 512 * 128
DEFAULT_MAX_QUEUE = 16  # requests waiting for a prediction slot; more get 503
# Seconds for a whole request body: 32 MB at 60 s needs 4.3 Mbit/s, slow for a local service.
DEFAULT_BODY_TIMEOUT = 60.0
_MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file

# SkipImage reasons that mean "too big" (413) or "a format we cannot decode" (415); others are 400.
_TOO_LARGE = {"decompression_bomb"}
_UNSUPPORTED = {"unsupported_format", "unsupported_transfer_syntax", "unsupported_image"}


def _static_dir() -> str:
    return str(resources.files("openmednet.serve") / "static")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


def create_app(
    predictor: Predictor | Segmenter,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_concurrent: int = 2,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    max_queue: int = DEFAULT_MAX_QUEUE,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> FastAPI:
    """Build the FastAPI application around ``predictor``.

    Args:
        predictor: the model and its input contract (``serve.predictor.load_predictor``).
        max_upload_bytes: largest accepted file.
        max_pixels: largest accepted image (width x height).
        max_frames: most images (frames, slices) accepted from one file.
        max_concurrent: predictions computed at the same time (CPU-bound work; more only queues).
        max_voxels: largest accepted NIfTI volume; the smaller of this and
            ``max_pixels * max_frames`` applies.
        max_queue: requests that may wait for a prediction slot; further ones get 503 (``0``:
            refuse whenever all slots are busy).
        body_timeout: seconds from the start of a request until its body must be complete; a
            slower or stalled upload gets 408 and its connection is closed.

    Returns:
        The app; serve it with uvicorn (``openmednet serve``) or test it with ``TestClient``.
    """
    if min(max_upload_bytes, max_pixels, max_frames, max_concurrent, max_voxels) < 1:
        raise ValueError("max_upload_bytes, max_pixels, max_frames, max_concurrent and max_voxels must be >= 1")
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if not body_timeout > 0:
        raise ValueError(f"body_timeout must be > 0 seconds, got {body_timeout}")
    # No /docs or /redoc: they load their scripts from a CDN (blank offline); /openapi.json stays.
    app = FastAPI(title="OpenMedNet", description="MedNet predictions with Grad-CAM overlays", version="1",
                  docs_url=None, redoc_url=None)
    slots = _Slots(max_concurrent, max_queue)
    limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_frames": max_frames}
    max_voxels = min(max_voxels, max_pixels * max_frames)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        # Refuse before Starlette spools the multipart body to disk.
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "send a Content-Length header (chunked uploads are not accepted)")
            if not length.isdigit() or int(length) > max_upload_bytes + _MULTIPART_OVERHEAD:
                return _error(413, f"upload of {length} bytes exceeds the limit of {max_upload_bytes} bytes")
        return await call_next(request)

    # Async routes run on the event loop, never in a worker thread: they answer while every
    # thread is busy with the model. The page is held in memory for the same reason (a
    # FileResponse reads its file in a worker thread).
    page = (resources.files("openmednet.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness probe."""
        return {"status": "ok"}

    card = predictor.card()  # fixed for the app's life; computed once
    task = getattr(predictor, "task", "classification")  # duck-typed predictors are classifiers

    @app.get("/api/model")
    async def model_card() -> dict[str, Any]:
        """The model card and the service's limits."""
        return {**card, "limits": limits}

    @app.post("/api/predict")
    async def predict(file: UploadFile = File(...), cam: bool = Query(True)) -> dict[str, Any]:
        """Class probabilities (and Grad-CAM overlays), or masks with pixel fractions (and mask
        overlays) for a segmentation model, for every image in the uploaded file."""
        data = await file.read(max_upload_bytes + 1)
        name = file.filename or "upload"
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name} exceeds the limit of {max_upload_bytes} bytes")
        if not data:
            raise HTTPException(400, f"{name} is empty")
        async with slots:
            # Reading, inference and PNG encoding are CPU work: a worker thread, not the event loop.
            results = await run_in_threadpool(
                _predict, predictor, data, name, cam, max_pixels=max_pixels, max_frames=max_frames,
                max_voxels=max_voxels,
            )
        return {"filename": name, "model": card["architecture"], "task": task,
                "label_names": list(predictor.label_names), "results": results}

    app.mount("/static", StaticFiles(directory=_static_dir()), name="static")
    app.add_middleware(_BodyDeadline, timeout=body_timeout)  # outermost: times every read of the body
    return app


class _BodyTimeout(Exception):
    """Raised by the timed ``receive`` when a request body is late."""


class _BodyDeadline:
    """ASGI middleware: a request's body must be complete ``timeout`` seconds after the request began.

    Uvicorn times out idle connections between requests, not a body that stops arriving: each
    stalled upload held a connection (and a spooled file) forever. Reads of the body are timed
    against one deadline, so a trickle of bytes cannot extend it; once the body is complete,
    later reads (Starlette waiting for a disconnect while the model runs) are not timed.

    A late body makes ``receive`` raise inside the app, which FastAPI reports as a body parsing
    error (400); that response is dropped and a 408 with ``Connection: close`` sent instead, after
    which the server closes the half-read connection.
    """

    def __init__(self, app: Any, timeout: float):
        self.app, self.timeout = app, timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        done = timed_out = started = False

        async def timed_receive() -> dict[str, Any]:
            nonlocal done, timed_out
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                timed_out = True
                raise _BodyTimeout from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if not timed_out:  # after a timeout, the app's own reaction (a 400) is replaced below
                started = started or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not timed_out:
                raise
        if timed_out and not started:
            logger.info("request body from %s not complete after %g s: 408", scope.get("client"), self.timeout)
            response = JSONResponse(status_code=408, headers={"Connection": "close"},
                                    content={"detail": f"the request body did not arrive within {self.timeout:g} s"})
            await response(scope, receive, send)


class _Slots:
    """At most ``limit`` holders at once and at most ``queue`` waiters; more get HTTP 503.

    The ``asyncio.Semaphore`` is made on first use in each event loop: one app may be served by
    several loops one after the other (test clients), and a semaphore belongs to one loop.
    """

    def __init__(self, limit: int, queue: int):
        self.limit, self.queue = limit, queue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._waiting = 0

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._semaphore, self._waiting = loop, asyncio.Semaphore(self.limit), 0
        assert self._semaphore is not None
        if self._semaphore.locked() and self._waiting >= self.queue:
            raise HTTPException(503, f"busy: {self.limit} predictions running and {self._waiting} waiting; "
                                     "retry shortly", headers={"Retry-After": "5"})
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1

    async def __aexit__(self, *exc: object) -> None:
        assert self._semaphore is not None
        self._semaphore.release()


def _predict(predictor: Predictor | Segmenter, data: bytes, name: str, cam: bool, **limits: int) -> list[dict[str, Any]]:
    """The JSON results of ``predictor.predict_bytes``, with reader failures turned into HTTP errors."""
    segment = getattr(predictor, "task", "classification") == "segmentation"
    try:
        if segment:
            preds = predictor.predict_bytes(data, name, **limits)
        else:
            preds = predictor.predict_bytes(data, name, cam=cam, **limits)
    except TooManyImagesError as e:
        raise HTTPException(413, f"{e}: split the volume or use `openmednet predict`") from None
    except SkipImage as e:
        status = 413 if e.reason in _TOO_LARGE else 415 if e.reason in _UNSUPPORTED else 400
        logger.info("refused %s (%s): %s", name, e.reason, e.message)
        raise HTTPException(status, f"{name}: {e.message} ({e.reason})") from None
    except NoReaderError:
        raise HTTPException(415, f"{name}: unsupported file type; send PNG, JPEG, TIFF, BMP, DICOM or "
                                 "NIfTI (.nii/.nii.gz)") from None
    except ValueError as e:  # an image breaking the input contract
        raise HTTPException(400, f"{name}: {e}") from None
    results = []
    for p in preds:
        item = p.to_dict()
        del item["source"]
        if segment:
            item["mask_png"] = base64.b64encode(p.mask_png()).decode("ascii")
        if cam:
            item["overlay_png"] = base64.b64encode(p.overlay_png()).decode("ascii")
        results.append(item)
    return results
