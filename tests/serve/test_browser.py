"""End to end in headless Chromium: `openmednet serve` in a subprocess, a user drops files on the page.

Needs Debian's chromium at /usr/bin/chromium (``apt-get install -y chromium``; .ci/run does it) and
the ``playwright`` Python package; it never downloads a browser (no ``playwright install``).
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"Debian chromium not found at {CHROMIUM}: apt-get install -y chromium"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir):
    """The real CLI and uvicorn, as a user would start them; yields the base URL."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "openmednet", "serve", str(model_dir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90  # importing torch on a busy 2-core machine takes a while
        while True:
            if proc.poll() is not None:
                pytest.fail(f"openmednet serve exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("openmednet serve did not answer /healthz within 90 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(server)
            yield page
        finally:
            browser.close()


def test_page_shows_model_card(page):
    page.wait_for_function("document.getElementById('model').textContent.includes('mednet_test')")
    assert "classes: no, yes" in page.inner_text("#model")


def test_drop_image_shows_prediction_and_overlay(page, server, real_files):
    expected = httpx.post(f"{server}/api/predict", files={"file": ("1 no.jpeg", real_files["gray"].read_bytes())},
                          timeout=30).json()["results"][0]
    page.set_input_files("#file", str(real_files["gray"]))
    page.wait_for_selector(".result img")
    assert page.inner_text(".result .label") == expected["label"]
    shown = [float(t) for t in page.locator(".result .prob").all_inner_texts()]
    expected_probs = sorted(expected["probabilities"].values(), reverse=True)
    assert shown == pytest.approx(expected_probs, abs=0.0005 + 1e-9)  # the page shows 3 decimals
    size = page.eval_on_selector(".result img", "img => [img.complete, img.naturalWidth, img.naturalHeight]")
    assert size == [True, 256, 256]
    assert "Done: 1 image(s)" in page.inner_text("#status")


def test_bad_file_shows_error_then_dropped_dicom_works(page, real_files, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"definitely not a PNG")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error").startswith("HTTP 400")
    assert page.locator(".result").count() == 0
    # A real drop event carrying the DICOM file (the drag-and-drop path, not the file chooser).
    page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name));
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        [base64.b64encode(real_files["dicom"].read_bytes()).decode(), real_files["dicom"].name],
    )
    page.wait_for_selector(".result img")  # the service kept serving after the bad upload
    assert page.is_hidden("#error")
    assert "CT_small.dcm" in page.inner_text(".result h2")
