"""A tiny real corpus for engine tests: 42 gray images of ../shared/data at 32 px, in one shard.

Two labelled sources (brain MRI: 4 tumour classes; paediatric chest X-ray: normal/pneumonia) and
unlabelled chest X-rays (covid_cxr_figure1 rows without a label), so the supervised objective sees
multi-source labels and masked unlabelled images. Per class: 4 train and 2 val images.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openmednet.data.shards import META_FIELDS, SPLITS, CorpusManifest, write_shard

SIZE = 32
PER_CLASS = {"train": 4, "val": 2}
SOURCES = {
    "brain_tumor_mri": ("gray/pretrain/brain_tumor_mri", ["glioma", "meningioma", "notumor", "pituitary"]),
    "chest_xray_pneumonia": ("gray/pretrain/chest_xray_pneumonia", ["NORMAL", "PNEUMONIA"]),
}
UNLABELLED = ("covid_cxr_figure1", "gray/pretrain/covid_cxr_figure1", 6)


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8)[None]


def build_tiny_corpus(shared_data: Path, root: Path) -> Path:
    """Write the corpus described in the module docstring to ``root``; returns ``root``."""
    images, labels, sources, splits, records = [], [], [], [], []
    label_names: list[str] = []
    source_names = [*SOURCES, UNLABELLED[0]]
    for s, (name, (rel, classes)) in enumerate(SOURCES.items()):
        rows = _rows(shared_data / rel)
        for cls in classes:
            label_names.append(f"{name}/{cls}")
            picked = [r for r in rows if r["label"] == cls][: sum(PER_CLASS.values())]
            split_of = [sp for sp, n in PER_CLASS.items() for _ in range(n)]
            for r, sp in zip(picked, split_of):
                images.append(_load(shared_data / rel / r["path"]))
                labels.append(len(label_names) - 1)
                sources.append(s)
                splits.append(SPLITS.index(sp))
                records.append({"path": r["path"], "source": name})
    name, rel, n = UNLABELLED
    for r in [r for r in _rows(shared_data / rel) if not r["label"]][:n]:
        images.append(_load(shared_data / rel / r["path"]))
        labels.append(-1)
        sources.append(len(source_names) - 1)
        splits.append(SPLITS.index("train"))
        records.append({"path": r["path"], "source": name})
    count = len(images)
    meta = {k: np.zeros(count, dtype=t) for k, t in META_FIELDS.items()}
    meta.update(label=np.array(labels), source=np.array(sources), split=np.array(splits))
    root.mkdir(parents=True, exist_ok=True)
    shard = write_shard(root, 0, np.stack(images), meta, records)
    CorpusManifest(
        version=1, channels=1, image_size=SIZE, shards=[shard],
        sources=[{"name": s} for s in source_names], label_names=label_names,
    ).save(root)
    return root


@pytest.fixture(scope="session")
def tiny_corpus(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny corpus (built once per session)."""
    return build_tiny_corpus(shared_data, tmp_path_factory.mktemp("tiny_corpus"))
