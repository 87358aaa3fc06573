"""The JSON API end to end with FastAPI's TestClient: results, limits, errors, concurrency."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import anyio.to_thread
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from openmednet.serve.app import create_app

MAX_BYTES = 400_000


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    app = create_app(predictor, max_upload_bytes=MAX_BYTES, max_pixels=1024 * 1024, max_frames=8)
    with TestClient(app) as c:
        yield c


def _post(client: TestClient, name: str, data: bytes, **params):
    return client.post("/api/predict", files={"file": (name, data)}, params=params)


def test_health_card_and_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    card = client.get("/api/model").json()
    assert card["architecture"] == "mednet_test"
    assert card["label_names"] == ["no", "yes"]
    assert card["input_contract"]["size"] == [64, 64]
    assert card["limits"] == {"max_upload_bytes": MAX_BYTES, "max_pixels": 1024 * 1024, "max_frames": 8}
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and "https://" not in page.text
    assert client.get("/static/app.js").status_code == 200


def test_predict_matches_library(client, predictor, real_files):
    response = _post(client, "scan.jpeg", real_files["gray"].read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    (expected,) = predictor.predict_path(real_files["gray"], cam=True)
    (result,) = body["results"]
    assert body["filename"] == "scan.jpeg" and body["label_names"] == ["no", "yes"]
    assert result["label"] == expected.label
    assert result["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)
    assert base64.b64decode(result["overlay_png"]) == expected.overlay_png()
    assert Image.open(io.BytesIO(base64.b64decode(result["overlay_png"]))).format == "PNG"


def test_dicom_without_suffix_and_cam_off(client, real_files):
    response = _post(client, "IM0001", real_files["dicom"].read_bytes(), cam="false")
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert "overlay_png" not in result and sum(result["probabilities"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("name", "payload", "status", "message"),
    [
        ("empty.png", b"", 400, "is empty"),
        ("text.png", b"this is not an image", 400, "not_an_image"),
        ("notes.txt", b"hello", 415, "unsupported file type"),
        ("huge.png", b"\0" * (MAX_BYTES + 70_000), 413, "exceeds the limit"),
        ("just_over.png", b"\0" * (MAX_BYTES + 10), 413, "just_over.png exceeds the limit"),  # checked after parsing
    ],
)
def test_bad_uploads_get_4xx_and_service_keeps_serving(client, real_files, name, payload, status, message):
    response = _post(client, name, payload)
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert _post(client, "ok.jpeg", real_files["gray"].read_bytes(), cam="false").status_code == 200


def test_truncated_real_image_pixel_and_frame_limits(client, real_files):
    truncated = real_files["gray"].read_bytes()[:200]
    assert _post(client, "cut.jpeg", truncated).status_code == 400
    big = io.BytesIO()
    Image.new("L", (1100, 1000)).save(big, format="PNG")  # 1.1 Mpx > 1 Mpx limit, tiny file
    response = _post(client, "big.png", big.getvalue())
    assert response.status_code == 413 and "decompression_bomb" in response.json()["detail"]
    response = _post(client, "brain.nii", real_files["nifti"].read_bytes())
    assert response.status_code == 413 and "more than the limit of 8" in response.json()["detail"]


def test_missing_file_field_and_missing_length(client):
    assert client.post("/api/predict", data={"x": "1"}).status_code == 422
    chunked = client.post("/api/predict", content=iter([b"abc"]), headers={"content-type": "application/octet-stream"})
    assert chunked.status_code == 411


def test_concurrent_requests_agree(client, real_files):
    payloads = [("a.jpeg", real_files["gray"].read_bytes()), ("b.dcm", real_files["dicom"].read_bytes())] * 8
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: _post(client, *p), payloads))
    assert [r.status_code for r in responses] == [200] * 16
    by_name: dict[str, list] = {}
    for r in responses:
        by_name.setdefault(r.json()["filename"], []).append(r.json()["results"])
    assert len(by_name) == 2
    for results in by_name.values():
        assert all(res == results[0] for res in results)  # identical JSON, overlays included


# --- review fixes: non-blocking routes, queue limit, upload limits -------------------------------


class _BlockingPredictor:
    """The real predictor behind a gate: predictions wait until ``release`` is set."""

    def __init__(self, real):
        self.real, self.label_names = real, real.label_names
        self.started, self.release = threading.Event(), threading.Event()

    def card(self):
        return self.real.card()

    def predict_bytes(self, *args, **kwargs):
        self.started.set()
        assert self.release.wait(60), "test never released the prediction"
        return self.real.predict_bytes(*args, **kwargs)


def _set_worker_threads(n: int) -> None:  # runs on the client's event loop
    anyio.to_thread.current_default_thread_limiter().total_tokens = n


def test_healthz_answers_and_excess_requests_get_503_while_busy(predictor, real_files):
    """One worker thread, busy with a prediction: /healthz still answers, one request queues, one gets 503."""
    gated = _BlockingPredictor(predictor)
    app = create_app(gated, max_upload_bytes=MAX_BYTES, max_concurrent=1, max_queue=1)
    image = real_files["gray"].read_bytes()
    with TestClient(app) as client, ThreadPoolExecutor(4) as pool:
        client.portal.call(_set_worker_threads, 1)  # a sync route or a thread-held wait would starve
        try:
            running = pool.submit(_post, client, "a.jpeg", image, cam="false")
            assert gated.started.wait(30)
            # One of these two waits for the slot, the other finds the queue full.
            others = [pool.submit(_post, client, name, image, cam="false") for name in ("b.jpeg", "c.jpeg")]
            refused = next(f for f in _first_done(others, timeout=30))
            assert refused.result().status_code == 503 and "busy" in refused.result().json()["detail"]
            assert refused.result().headers["retry-after"] == "5"
            for path in ("/healthz", "/api/model", "/"):
                assert pool.submit(client.get, path).result(timeout=10).status_code == 200
        finally:
            gated.release.set()
        statuses = sorted(f.result(timeout=60).status_code for f in [running, *others])
    assert statuses == [200, 200, 503]


def _first_done(futures, timeout):
    from concurrent.futures import FIRST_COMPLETED, wait

    done, _ = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
    assert done, "no request was refused while the queue was full"
    return done


def test_bad_limits_are_refused(predictor):
    with pytest.raises(ValueError, match="max_queue must be >= 0"):
        create_app(predictor, max_queue=-1)
    with pytest.raises(ValueError, match="max_voxels"):
        create_app(predictor, max_voxels=0)


def _gif(frames: int) -> bytes:
    images = [Image.new("L", (8, 8), 10 * (i + 1)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=10)
    return buf.getvalue()


def test_upload_formats_and_limits(client, predictor, tmp_path):
    response = _post(client, "anim.gif", _gif(9))  # max_frames=8: refused from the frame count
    assert response.status_code == 413 and "9 frames, limit is 8" in response.json()["detail"]
    buf = io.BytesIO()
    np.savez(buf, train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    response = _post(client, "mnist.npz", buf.getvalue())
    assert response.status_code == 415 and "unsupported file type" in response.json()["detail"]
    volume = np.random.default_rng(0).integers(0, 1000, (32, 32, 8)).astype(np.int16)  # 8192 voxels
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii")
    with TestClient(create_app(predictor, max_voxels=8191)) as small:
        response = _post(small, "v.nii", (tmp_path / "v.nii").read_bytes(), cam="false")
        assert response.status_code == 413 and "exceeds 8191 voxels" in response.json()["detail"]
    with TestClient(create_app(predictor, max_pixels=1024, max_frames=7)) as small:  # 1024 * 7 < 8192
        response = _post(small, "v.nii", (tmp_path / "v.nii").read_bytes(), cam="false")
        assert response.status_code == 413 and "exceeds 7168 voxels" in response.json()["detail"]
