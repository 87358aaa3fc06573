"""Helpers for loader tests: tiny corpora written with ``shards.write_shard`` from real images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from openmednet.data.shards import FORMAT_VERSION, SPLITS, CorpusManifest, write_shard


def read_labels(folder: Path, per_label: int) -> list[tuple[Path, str, str]]:
    """The first ``per_label`` ``(path, label, split)`` rows of each label of ``folder/labels.csv``."""
    taken: dict[str, int] = {}
    rows = []
    with open(folder / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["label"] and taken.get(row["label"], 0) < per_label:
                taken[row["label"]] = taken.get(row["label"], 0) + 1
                rows.append((folder / row["path"], row["label"], row["split"]))
    return rows


def load_square(path: Path, size: int, channels: int) -> np.ndarray:
    """``(C, size, size)`` uint8 of a real image file (PIL resize, gray = ``L`` mode)."""
    img = Image.open(path).convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
    a = np.array(img)  # writable copy (torch.from_numpy warns on read-only arrays)
    return a[None] if channels == 1 else a.transpose(2, 0, 1).copy()


def write_tiny_corpus(
    root: Path, sources: dict[str, list[tuple[Path, str, str]]], *, channels: int, size: int
) -> CorpusManifest:
    """Write a one-shard corpus of the given ``{source name: rows}`` with every image labelled.

    Labels become ``"<source>/<label>"``; split strings map to ``SPLITS`` (empty -> -1).
    """
    label_names: list[str] = []
    images, meta = [], {"label": [], "source": [], "split": [], "group": [], "phash": []}
    for s, (name, rows) in enumerate(sources.items()):
        for path, label, split in rows:
            full = f"{name}/{label}"
            if full not in label_names:
                label_names.append(full)
            images.append(load_square(path, size, channels))
            meta["label"].append(label_names.index(full))
            meta["source"].append(s)
            meta["split"].append(SPLITS.index(split) if split in SPLITS else -1)
            meta["group"].append(-1)
            meta["phash"].append(0)
    records = [{"path": str(p)} for rows in sources.values() for p, _, _ in rows]
    info = write_shard(root, 0, np.stack(images), {k: np.array(v) for k, v in meta.items()}, records)
    manifest = CorpusManifest(
        version=FORMAT_VERSION, channels=channels, image_size=size, shards=[info],
        sources=[{"name": n} for n in sources], label_names=label_names,
    )
    manifest.save(root)
    return manifest
