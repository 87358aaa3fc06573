"""The JSON API end to end with FastAPI's TestClient: results, limits, errors, concurrency."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

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
