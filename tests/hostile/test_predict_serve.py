"""Issue 14, predict and serve: random models, leaked paths, CDN pages, stalled uploads, skipped files.

The service tests run the real app: FastAPI's TestClient for the routes, and a real uvicorn server
on a loopback port with raw sockets for the stalled uploads (the TestClient has no network layer).
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from openmednet import create_model
from openmednet.cli.app import app as cli
from openmednet.export.safetensors import export_safetensors
from openmednet.serve.app import create_app
from openmednet.serve.predictor import Predictor, load_model

runner = CliRunner()
GRAY = "gray/targets/brain_mri_yes_no/no/1 no.jpeg"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    export_safetensors(create_model("mednet_test", num_classes=2).eval(), out, label_names=("no", "yes"))
    return out


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(Predictor.from_spec(model_dir))) as c:
        yield c


# --------------------------------------------------------------------------------- random models
@pytest.mark.parametrize("command", ["predict", "serve"])
@pytest.mark.parametrize("spec", ["mednet_gray", "mednet_gray.sup_cpu64_v1"])
def test_registry_name_without_a_classifier_is_refused(shared_data, command, spec):
    """The probe: `predict mednet_gray FILE` ran a random 1000-class model (class_472, then class_189)."""
    args = [command, spec] + ([str(shared_data / GRAY)] if command == "predict" else ["--port", "1"])
    result = runner.invoke(cli, args)
    assert isinstance(result.exception, ValueError), result.output
    message = str(result.exception)
    assert "has no classifier" in message and "openmednet finetune" in message and "runs/x/model" in message


def test_architecture_without_weights_is_never_built_at_random(shared_data):
    with pytest.raises(ValueError, match="without weights: a randomly initialised model predicts noise.*finetune"):
        load_model("mednet_test")
    result = runner.invoke(cli, ["predict", "mednet_test", str(shared_data / GRAY)])
    assert isinstance(result.exception, ValueError) and "class_" not in result.output


def test_registry_name_loads_its_shipped_weights_not_random_ones():
    a, b = load_model("mednet_gray"), load_model("mednet_gray")
    assert a.pretrained_cfg.source == "package" and a.num_classes == 0
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_help_names_a_model_that_works(command):
    text = runner.invoke(cli, [command, "--help"]).output
    assert "runs/busi/model" in text and "openmednet finetune" in text
    assert "mednet_gray.<tag>" not in text  # a backbone: refused above


# --------------------------------------------------------------------------------- leaked paths
@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("scan.nii", b"\x5c\x01\0\0" + b"\0" * 400),
        ("scan.nii.gz", gzip.compress(b"\x5c\x01\0\0" + b"\xff" * 400)),
        ("scan.nii.gz", b"not gzip at all"),
        ("scan.dcm", b"garbage" * 20),
        ("scan.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 30),
    ],
)
def test_upload_errors_never_reveal_the_servers_temp_path(client, name, payload):
    response = client.post("/api/predict", files={"file": (name, payload)})
    assert 400 <= response.status_code < 500
    detail = response.json()["detail"]
    assert "openmednet-upload" not in detail and "/tmp" not in detail and "upload." not in detail, detail
    assert detail.startswith(name)


# --------------------------------------------------------------------------------- CDN pages
def test_no_page_loads_anything_from_the_internet(client):
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
    for path in ("/", "/openapi.json", "/static/app.js", "/static/style.css"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert not any(url in response.text for url in ("https://", "http://", "//cdn")), path


# --------------------------------------------------------------------------------- stalled uploads
@pytest.fixture
def server(model_dir):
    """A real uvicorn server on a free loopback port, with a 1 s body timeout."""
    app = create_app(Predictor.from_spec(model_dir), body_timeout=1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    thread.join(10)


_HEAD = (b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
         b"Content-Length: 5000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n")


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_stalled_uploads_get_408_and_are_closed(server):
    """The probe left 60 stalled uploads open; each now ends at the body deadline."""
    socks = []
    for _ in range(30):
        sock = socket.create_connection(("127.0.0.1", server), timeout=15)
        sock.sendall(_HEAD + b"\x89PNG")  # 5000 bytes announced, a few sent, then nothing
        socks.append(sock)
    start = time.monotonic()
    replies = [_read_until_closed(s) for s in socks]  # recv() returns b"" once the server closed
    elapsed = time.monotonic() - start
    for s in socks:
        s.close()
    assert all(r.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in r for r in replies), replies[0]
    assert elapsed < 10
    with socket.create_connection(("127.0.0.1", server), timeout=15) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b'{"status":"ok"}' in _read_until_closed(sock)


def test_a_trickle_does_not_extend_the_deadline(server):
    with socket.create_connection(("127.0.0.1", server), timeout=15) as sock:
        sock.sendall(_HEAD)
        start = time.monotonic()
        sock.settimeout(0.3)
        reply = b""
        while not reply and time.monotonic() - start < 8:
            try:
                sock.sendall(b"x")  # one byte every 0.3 s: never idle, never complete
                reply = sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        assert time.monotonic() - start < 4


def test_a_complete_upload_is_not_timed_out_while_the_model_runs(server, shared_data):
    """Only the body is timed: a normal upload over the loopback still gets its prediction."""
    import httpx

    data = (shared_data / GRAY).read_bytes()
    response = httpx.post(f"http://127.0.0.1:{server}/api/predict", files={"file": ("a.jpeg", data)}, timeout=30)
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------------- skipped inputs
def test_predict_exits_3_when_inputs_were_skipped(model_dir, shared_data, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(shared_data / GRAY, folder / "good.jpeg")
    (folder / "truncated.jpeg").write_bytes((shared_data / GRAY).read_bytes()[:200])
    out = tmp_path / "p.csv"
    result = runner.invoke(cli, ["predict", str(model_dir), str(folder), "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "1 input file(s) skipped" in result.output
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["source"]).name for r in rows] == ["good.jpeg"]  # the rest is still predicted
    # Without the bad file: exit code 0.
    (folder / "truncated.jpeg").unlink()
    assert runner.invoke(cli, ["predict", str(model_dir), str(folder)]).exit_code == 0


def test_predict_exit_code_is_documented():
    text = runner.invoke(cli, ["predict", "--help"]).output
    assert "Exit codes" in text and "3 some files unreadable and skipped" in text


def test_an_unreadable_image_is_not_counted_as_a_prediction(model_dir, tmp_path):
    bad = tmp_path / "blank.png"
    buf = io.BytesIO()
    Image.new("L", (64, 64)).save(buf, "PNG")
    bad.write_bytes(buf.getvalue()[:40])
    result = runner.invoke(cli, ["predict", str(model_dir), str(bad)])
    assert isinstance(result.exception, ValueError) and "no readable image" in str(result.exception)
