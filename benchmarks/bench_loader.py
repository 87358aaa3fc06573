"""Loader throughput with augmentation at 64 px, as a multiple of MedNet's training speed.

Issue 3 asks for a loader at least 10x faster than MedNet trains on the same machine, so the
loader never starves the model. Both are measured in this run (shared machines drift): the
reference is ``mednet_gray`` (width 1.0) training at 64 px, batch 64, bf16 autocast and
channels_last (SGD step included), measured before and after the loader rows (the median of
both is used). Each loader row iterates a ``CorpusDataset`` over memory-mapped shards with the
full training augmentation of its version, batched (``build_transform(..., train=True)``, a
``BatchAugment``) and per image (the torchvision pipeline it replaced, kept as its test oracle in
tests/data/augment_reference.py), through ``build_loader`` with
0, 1 or 2 workers, at one intra-op thread per loading process; the first
epoch (worker start-up, page cache) is untimed.

By default the corpora are written to a temporary directory from real images of
../shared/data (brain MRI for gray, blood-cell smears for colour, resized to 64 px with PIL), in
the same shard format ``openmednet corpus build`` produces; ``--gray-corpus``/``--color-corpus``
use built corpora instead.

Usage::

    .venv/bin/python benchmarks/bench_loader.py                      # defaults: 1024 images, workers 0,1,2
    .venv/bin/python benchmarks/bench_loader.py --workers 0 2 --images 512
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import environment, markdown_table, time_fn
from PIL import Image
from torchvision.transforms import v2

from openmednet.data.datasets import CorpusDataset
from openmednet.data.loader import build_loader
from openmednet.data.shards import FORMAT_VERSION, CorpusManifest, write_shard
from openmednet.data.transforms import FastColorJitter, build_transform
from openmednet.models import create_model

REPO = Path(__file__).resolve().parents[1]
# The per-image pipeline is a test oracle, not library code: timed here as the baseline.
sys.path.insert(0, str(REPO / "tests" / "data"))
from augment_reference import reference_pipeline

SHARED = REPO.parent / "shared" / "data"
SOURCES = {
    "gray": (SHARED / "gray/pretrain/brain_tumor_mri", 1),
    "color": (SHARED / "color/pretrain/pbc_blood_cells", 3),
}
SIZE = 64


def write_corpus(folder: Path, out: Path, channels: int, count: int) -> Path:
    """A one-shard corpus of the first ``count`` labelled images of ``folder/labels.csv`` at 64 px."""
    with open(folder / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["label"]][:count]
    if not rows:
        raise FileNotFoundError(f"no labelled images in {folder}/labels.csv")
    names = sorted({r["label"] for r in rows})
    mode = "L" if channels == 1 else "RGB"
    images = []
    for r in rows:
        a = np.array(Image.open(folder / r["path"]).convert(mode).resize((SIZE, SIZE), Image.BILINEAR))
        images.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
    n = len(rows)
    meta = {
        "label": np.array([names.index(r["label"]) for r in rows]), "source": np.zeros(n), "split": np.zeros(n),
        "group": np.full(n, -1), "phash": np.zeros(n),
    }
    info = write_shard(out, 0, np.stack(images), meta, [{"path": r["path"]} for r in rows])
    CorpusManifest(FORMAT_VERSION, channels, SIZE, [info], [{"name": folder.name}], names).save(out)
    return out


def training_rate(batch: int, steps: int) -> float:
    """Images/s of ``mednet_gray`` training steps at 64 px (bf16 autocast, channels_last, SGD)."""
    model = create_model("mednet_gray", num_classes=10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, SIZE, SIZE, generator=gen).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=gen)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / time_fn(step, warmup=2, iters=steps).median


def loader_rate(root: Path, channels: int, workers: int, batch: int, epochs: int, batched: bool) -> float:
    """Images/s of ``epochs`` timed epochs of an augmented loader (after one untimed epoch)."""
    # One intra-op thread, as torch gives each worker: per-image ops on 64 px tensors are too small
    # to split, and with 2 threads on a loaded machine OpenMP spin-waits dominate (measured: 49 vs
    # ~1000 img/s for gray with 0 workers).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _loader_rate(root, channels, workers, batch, epochs, batched)
    finally:
        torch.set_num_threads(threads)


def _loader_rate(root: Path, channels: int, workers: int, batch: int, epochs: int, batched: bool) -> float:
    cfg = {"input_size": (channels, SIZE, SIZE), "mean": (0.5,) * channels, "std": (0.25,) * channels}
    transform = build_transform(cfg, train=True) if batched else reference_pipeline(cfg)
    dataset = CorpusDataset(root, transform=transform)
    loader = build_loader(dataset, batch_size=batch, num_workers=workers, seed=0)
    for _ in loader:  # start workers, fault the memory map in
        pass
    count, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.sampler.set_epoch(epoch)
        for images, _, _ in loader:
            count += len(images)
    elapsed = time.perf_counter() - start
    del loader  # stops persistent workers
    return count / elapsed


def trimmed_mean_us(times: tuple[float, ...]) -> float:
    """Mean of the fastest 90 % of ``times`` in microseconds.

    A mean, not a median, because steps applied with p = 0.5 cost either ~0 or their full price
    (the median picks one of the two); the slowest 10 % are dropped as preemption by other
    processes.
    """
    kept = sorted(times)[: max(1, int(len(times) * 0.9))]
    return statistics.mean(kept) * 1e6


def step_costs(root: Path, channels: int, calls: int = 400) -> list[tuple[str, float]]:
    """Cost (us, :func:`trimmed_mean_us`) of each training pipeline step on the corpus' first image."""
    cfg = {"input_size": (channels, SIZE, SIZE), "mean": (0.5,) * channels, "std": (0.25,) * channels}
    pipeline = reference_pipeline(cfg)
    x = CorpusDataset(root)[0][0]
    costs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in pipeline.transforms:
            timing = time_fn(lambda step=step, x=x: step(x), warmup=5, iters=calls)
            costs.append((type(step).__name__, trimmed_mean_us(timing.times)))
            if isinstance(step, FastColorJitter):  # what it replaces, on the same input
                tv = v2.ColorJitter(step.brightness, step.contrast, step.saturation, step.hue)
                timing = time_fn(lambda x=x: tv(x), warmup=5, iters=calls)
                costs.append(("(torchvision ColorJitter, same ranges)", trimmed_mean_us(timing.times)))
            x = step(x)
    finally:
        torch.set_num_threads(threads)
    return costs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="images per corpus")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loader row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-steps", type=int, default=5, help="timed MedNet training steps")
    parser.add_argument("--gray-corpus", type=Path, help="use this built gray corpus")
    parser.add_argument("--color-corpus", type=Path, help="use this built colour corpus")
    args = parser.parse_args(argv)

    print(environment())
    with tempfile.TemporaryDirectory() as tmp:
        roots = {
            "gray": args.gray_corpus or write_corpus(SOURCES["gray"][0], Path(tmp) / "gray", 1, args.images),
            "color": args.color_corpus or write_corpus(SOURCES["color"][0], Path(tmp) / "color", 3, args.images),
        }
        reference = [training_rate(args.batch_size, args.train_steps)]
        print(f"MedNet (mednet_gray, width 1.0) training at {SIZE} px, bf16 + channels_last: {reference[0]:.1f} img/s")
        rows = []
        for version, root in roots.items():
            channels = SOURCES[version][1]
            for batched in (True, False):
                pipeline = "batched" if batched else "per-image"
                for workers in args.workers:
                    rate = loader_rate(root, channels, workers, args.batch_size, args.epochs, batched)
                    rows.append([version, pipeline, workers, rate])
                    print(f"  loader {version:5s} {pipeline:9s} workers={workers}: {rate:.0f} img/s", flush=True)
        reference.append(training_rate(args.batch_size, args.train_steps))
        costs = {version: step_costs(root, SOURCES[version][1]) for version, root in roots.items()}
    train = statistics.median(reference)
    print(f"MedNet training again: {reference[1]:.1f} img/s; reference = median {train:.1f} img/s\n")
    table = [[v, p, w, f"{r:.0f}", f"{r / train:.1f}x", "yes" if r / train >= 10 else "no"] for v, p, w, r in rows]
    print(markdown_table(["version", "pipeline", "workers", "loader img/s", "vs MedNet training", ">= 10x"], table))
    print(
        "\nPer-image pipeline (tests/data/augment_reference.py): cost of each training transform step "
        "(us, mean of the fastest 90 % of 400 calls, 1 thread):\n"
    )
    names = [name for name, _ in costs["color"]]  # the colour pipeline's steps include the gray ones
    per_version = {v: dict(c) for v, c in costs.items()}
    step_rows = [[n, *(f"{per_version[v][n]:.0f}" if n in per_version[v] else "-" for v in costs)] for n in names]
    totals = [sum(c for n, c in costs[v] if not n.startswith("(")) for v in costs]
    step_rows.append(["total (without the comparison row)", *(f"{t:.0f}" for t in totals)])
    print(markdown_table(["step", *costs], step_rows))


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
