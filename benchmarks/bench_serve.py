"""Serving benchmark: per-image latency of PyTorch eager vs onnxruntime, and service throughput.

Part 1 (latency). The model runs one image at a time (batch 1, the web service's case) on real
images preprocessed with the model card's contract, in PyTorch eager mode (``torch.no_grad``) and
in onnxruntime on the ONNX file ``export_onnx`` writes (checked equal within 1e-4 first). The two
backends alternate image by image, so load changes on a shared machine hit both alike. Reports
p50/p95 per image and the ratio eager/onnxruntime (> 1: onnxruntime is faster).

Part 2 (throughput). ``openmednet.serve.create_app`` runs under uvicorn in a thread on a free
127.0.0.1 port; ``--concurrency`` client threads send ``--requests`` uploads (real JPEG and DICOM
files, Grad-CAM on unless ``--no-cam``) over loopback, stopping at ``--max-seconds``. The
reference, measured in the same run, is the same uploads through ``Predictor.predict_bytes`` in
process, one after another: the ratio service/in-process shows what HTTP, multipart parsing and
concurrency cost or gain.

Usage::

    python benchmarks/bench_serve.py                          # mednet_test, 64 px, ~1 min
    python benchmarks/bench_serve.py --model runs/busi/model --requests 64 --concurrency 4
"""

from __future__ import annotations

import argparse
import itertools
import socket
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import torch
import uvicorn
from _common import environment, markdown_table

from openmednet import create_model
from openmednet.export.onnx import export_onnx
from openmednet.serve.app import create_app
from openmednet.serve.predictor import ChannelConversionWarning, Predictor, load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def percentile(values: list[float], q: float) -> float:
    """``q``-th percentile (linear interpolation, NumPy's default)."""
    return float(np.percentile(values, q))


def real_files(data: Path, n: int) -> list[Path]:
    """``n`` real files: chest X-ray and brain MRI JPEGs plus DICOMs, in a fixed order."""
    pools = [
        sorted((data / "gray/pretrain/chest_xray_pneumonia/original_subset").rglob("*.jp*g")),
        sorted((data / "gray/targets/brain_mri_yes_no").rglob("*.jp*g")),
        sorted((data / "formats/pydicom-3.0.2").glob("*_small*.dcm")),
    ]
    files = [f for group in itertools.zip_longest(*pools) for f in group if f is not None]  # interleave formats
    if len(files) < n:
        sys.exit(f"need {n} real files under {data}, found {len(files)} (set --data)")
    return files[:n]


def latency(predictor: Predictor, files: list[Path], onnx_path: Path, threads: int, warmup: int) -> dict:
    """Per-image seconds for PyTorch eager and onnxruntime, alternating backends image by image."""
    from openmednet.data.readers import read_images

    inputs = []
    for f in files:
        array, _ = next(iter(read_images(f)))  # first frame of each file
        inputs.append(predictor.preprocess(array, str(f))[0][None].numpy())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    model = predictor.model

    def run_torch(x: np.ndarray) -> None:
        with torch.no_grad():
            model(torch.from_numpy(x))

    def run_ort(x: np.ndarray) -> None:
        session.run(None, {"input": x})

    for x in inputs[:warmup]:
        run_torch(x), run_ort(x)
    times: dict[str, list[float]] = {"PyTorch eager": [], "onnxruntime": []}
    for x in inputs:
        for name, fn in (("PyTorch eager", run_torch), ("onnxruntime", run_ort)):
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    return times


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(predictor: Predictor, uploads: list[tuple[str, bytes]], cam: bool) -> list[float]:
    """Seconds per upload through ``predict_bytes`` (+ PNG encoding, as the service does), sequential."""
    times = []
    for name, data in uploads:
        start = time.perf_counter()
        for p in predictor.predict_bytes(data, name, cam=cam):
            if cam:
                p.overlay_png()
        times.append(time.perf_counter() - start)
    return times


def service(predictor: Predictor, uploads: list[tuple[str, bytes]], cam: bool, concurrency: int,
            max_seconds: float) -> tuple[list[float], float, int]:
    """Per-request seconds, wall time and failures for ``uploads`` sent by ``concurrency`` clients."""
    port = _free_port()
    config = uvicorn.Config(create_app(predictor, max_concurrent=concurrency), host="127.0.0.1", port=port,
                            log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.05)
    deadline = time.monotonic() + max_seconds
    times, failures = [], 0
    lock = threading.Lock()

    def send(client: httpx.Client, upload: tuple[str, bytes]) -> None:
        nonlocal failures
        if time.monotonic() > deadline:
            return
        start = time.perf_counter()
        r = client.post(f"{url}/api/predict", files={"file": upload}, params={"cam": str(cam).lower()}, timeout=60)
        with lock:
            times.append(time.perf_counter() - start)
            failures += r.status_code != 200

    try:
        with httpx.Client() as client, ThreadPoolExecutor(concurrency) as pool:
            send(client, uploads[0])  # warm-up request (lazy imports, first-call allocations)
            times.clear()
            start = time.perf_counter()
            list(pool.map(lambda u: send(client, u), uploads))
            wall = time.perf_counter() - start
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return times, wall, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model name or directory (default: 2-class mednet_test)")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared real-data tree")
    parser.add_argument("--images", type=int, default=60, help="images for the latency part")
    parser.add_argument("--requests", type=int, default=48, help="uploads for the throughput part")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (and service slots)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop sending after this long")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of torch and onnxruntime")
    parser.add_argument("--no-cam", action="store_true", help="requests without Grad-CAM")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # Brain MRI JPEGs are gray content saved as RGB: the conversion is expected here.
    warnings.simplefilter("ignore", ChannelConversionWarning)
    torch.manual_seed(0)
    model = load_model(args.model) if args.model else create_model("mednet_test", num_classes=2).eval()
    predictor = Predictor(model)
    cam = not args.no_cam
    print(environment())
    print(f"model {predictor.card()['architecture']}, input {predictor.cfg.input_size}\n")

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", check=True)
        times = latency(predictor, real_files(args.data, args.images), onnx_path, args.threads, warmup=5)
    eager, onnx = times["PyTorch eager"], times["onnxruntime"]
    rows = [[name, len(t), f"{percentile(t, 50) * 1e3:.2f}", f"{percentile(t, 95) * 1e3:.2f}"]
            for name, t in times.items()]
    print(markdown_table(["backend (batch 1)", "images", "p50 ms", "p95 ms"], rows))
    print(f"\nratio eager/onnxruntime: p50 {percentile(eager, 50) / percentile(onnx, 50):.2f}x, "
          f"p95 {percentile(eager, 95) / percentile(onnx, 95):.2f}x\n")

    files = real_files(args.data, args.requests)
    uploads = [(f.name, f.read_bytes()) for f in files]
    reference = in_process(predictor, uploads, cam)
    req_times, wall, failures = service(predictor, uploads, cam, args.concurrency, args.max_seconds)
    ref_rate = len(reference) / sum(reference)
    rate = len(req_times) / wall
    rows = [
        ["in process, sequential (reference)", len(reference), f"{ref_rate:.1f}",
         f"{percentile(reference, 50) * 1e3:.1f}", f"{percentile(reference, 95) * 1e3:.1f}", "-"],
        [f"service, {args.concurrency} concurrent clients", len(req_times), f"{rate:.1f}",
         f"{percentile(req_times, 50) * 1e3:.1f}", f"{percentile(req_times, 95) * 1e3:.1f}", str(failures)],
    ]
    print(markdown_table(["path (cam " + ("on" if cam else "off") + ")", "requests", "req/s", "p50 ms", "p95 ms",
                          "failures"], rows))
    print(f"\nratio service/in-process throughput: {rate / ref_rate:.2f}x")
    if failures:
        sys.exit(f"{failures} requests failed")


if __name__ == "__main__":
    main()
