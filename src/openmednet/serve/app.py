"""The web service: a drop-an-image page and a JSON API over a :class:`Predictor`.

Routes:
    ``GET /``             the page (``serve/static``: plain HTML + JS, no CDN, works offline).
    ``GET /healthz``      ``{"status": "ok"}``.
    ``GET /api/model``    the model card: architecture, labels, input contract, service limits.
    ``POST /api/predict`` multipart ``file`` (PNG/JPEG/TIFF, DICOM, NIfTI); query ``cam`` (default
                          true). Returns ``{"filename", "model", "label_names", "results": [{"frame",
                          "label", "probabilities", "notes", "overlay_png"}]}``, where ``overlay_png``
                          is the base64 PNG of the Grad-CAM over the model's view of the image.

Limits, so one request cannot exhaust the machine: request bodies above ``max_upload_bytes`` are
refused from their ``Content-Length`` before they are read (413; no length: 411), images above
``max_pixels`` are refused from their header where the format allows (413), files with more than
``max_frames`` images are refused (413), and at most ``max_concurrent`` predictions run at once
(the others wait). Bad uploads get a 4xx with a message; the service keeps serving.

Run it with ``openmednet serve MODEL`` (binds 127.0.0.1 by default).
"""

from __future__ import annotations

import base64
import logging
import threading
from importlib import resources
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from openmednet.data.readers import SkipImage
from openmednet.serve.predictor import Predictor, TooManyImagesError

__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MAX_UPLOAD_BYTES", "create_app"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # a large uncompressed DICOM radiograph is ~20-30 MB
DEFAULT_MAX_PIXELS = 4096 * 4096  # full-field mammograms are ~4k x 5k: downsample those first
DEFAULT_MAX_FRAMES = 64
_MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file

# SkipImage reasons that mean "too big" (413) or "a format we cannot decode" (415); others are 400.
_TOO_LARGE = {"decompression_bomb"}
_UNSUPPORTED = {"unsupported_format", "unsupported_transfer_syntax", "unsupported_image"}


def _static_dir() -> str:
    return str(resources.files("openmednet.serve") / "static")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


def create_app(
    predictor: Predictor,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_concurrent: int = 2,
) -> FastAPI:
    """Build the FastAPI application around ``predictor``.

    Args:
        predictor: the model and its input contract.
        max_upload_bytes: largest accepted file.
        max_pixels: largest accepted image (width x height).
        max_frames: most images (frames, slices) accepted from one file.
        max_concurrent: predictions computed at the same time (CPU-bound work; more only queues).

    Returns:
        The app; serve it with uvicorn (``openmednet serve``) or test it with ``TestClient``.
    """
    if min(max_upload_bytes, max_pixels, max_frames, max_concurrent) < 1:
        raise ValueError("max_upload_bytes, max_pixels, max_frames and max_concurrent must be >= 1")
    app = FastAPI(title="OpenMedNet", description="MedNet predictions with Grad-CAM overlays", version="1")
    slots = threading.BoundedSemaphore(max_concurrent)
    limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_frames": max_frames}

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

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(f"{_static_dir()}/index.html", media_type="text/html")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness probe."""
        return {"status": "ok"}

    @app.get("/api/model")
    def model_card() -> dict[str, Any]:
        """The model card and the service's limits."""
        return {**predictor.card(), "limits": limits}

    @app.post("/api/predict")
    def predict(file: UploadFile = File(...), cam: bool = Query(True)) -> dict[str, Any]:
        """Class probabilities (and Grad-CAM overlays) for every image in the uploaded file."""
        # Sync endpoint: FastAPI runs it in a worker thread, so inference never blocks the event loop.
        data = file.file.read(max_upload_bytes + 1)
        name = file.filename or "upload"
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name} exceeds the limit of {max_upload_bytes} bytes")
        if not data:
            raise HTTPException(400, f"{name} is empty")
        with slots:
            preds = _predict(predictor, data, name, cam, max_pixels, max_frames)
        results = []
        for p in preds:
            item = p.to_dict()
            del item["source"]
            if cam:
                item["overlay_png"] = base64.b64encode(p.overlay_png()).decode("ascii")
            results.append(item)
        return {"filename": name, "model": predictor.card()["architecture"],
                "label_names": list(predictor.label_names), "results": results}

    app.mount("/static", StaticFiles(directory=_static_dir()), name="static")
    return app


def _predict(predictor: Predictor, data: bytes, name: str, cam: bool, max_pixels: int, max_frames: int) -> list:
    """``predictor.predict_bytes`` with reader failures turned into HTTP errors."""
    try:
        return predictor.predict_bytes(data, name, cam=cam, max_pixels=max_pixels, max_frames=max_frames)
    except TooManyImagesError as e:
        raise HTTPException(413, f"{e}: split the volume or use `openmednet predict`") from None
    except SkipImage as e:
        status = 413 if e.reason in _TOO_LARGE else 415 if e.reason in _UNSUPPORTED else 400
        logger.info("refused %s (%s): %s", name, e.reason, e.message)
        raise HTTPException(status, f"{name}: {e.message} ({e.reason})") from None
    except ValueError as e:  # no reader for the file, or an image breaking the input contract
        if str(e).startswith("no reader"):
            raise HTTPException(415, f"{name}: unsupported file type; send PNG, JPEG, TIFF, BMP, DICOM or "
                                     "NIfTI (.nii/.nii.gz)") from None
        raise HTTPException(400, f"{name}: {e}") from None
