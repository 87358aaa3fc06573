"""The corpus storage format: the only module that knows how shards are laid out on disk.

A corpus directory holds::

    manifest.json              format version, image size/channels, shard list, label and source
                               tables, build parameters and statistics (written last, atomically)
    shard-00000/images.npy     uint8 array (N, C, S, S), read by memory map (never loaded whole)
    shard-00000/meta.npz       per-image int arrays: label, source, split, group, phash
    shard-00000/records.jsonl  per-image provenance: original path, frame, source, label, content
                               hashes (SHA-1 of pixels and file bytes, 256-bit phash), ...

A shard is written into ``shard-XXXXX.tmp/`` and renamed to ``shard-XXXXX/`` when complete, so a
killed build never leaves a half-written shard visible; a resumed build skips complete shards.

Why ``.npy`` and not tar/WebDataset: random access by index through ``np.load(mmap_mode="r")`` costs
one page fault per image, works with any sampler (class-balanced, distributed) and with several
loader workers without copying the corpus into RAM. See docs/corpus.md.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openmednet.utils import atomic_write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
UNLABELLED = -1
NO_SPLIT = -1

# per-image integer metadata kept in meta.npz (name -> dtype)
META_FIELDS: dict[str, str] = {
    "label": "int32",  # index into manifest.label_names, -1 = unlabelled
    "source": "int16",  # index into manifest.sources
    "split": "int8",  # index into SPLITS, -1 = none
    "group": "int64",  # stable hash of (source, group id); -1 = none
    "phash": "uint64",  # 64-bit perceptual hash (near-duplicate detection)
}


def shard_name(index: int) -> str:
    """``3 -> "shard-00003"``."""
    return f"shard-{index:05d}"


@dataclass
class ShardInfo:
    """One complete shard: its directory name and image count."""

    name: str
    count: int


@dataclass
class CorpusManifest:
    """The contents of ``manifest.json``.

    Attributes:
        version: storage format version (``FORMAT_VERSION``).
        channels: 1 (gray) or 3 (colour).
        image_size: side ``S`` of every stored image.
        shards: complete shards in index order.
        sources: source tables: ``{"name", "modality", "license", ...}`` per source.
        label_names: global label space, ``"<source>/<label>"`` strings; ``meta.label`` indexes it.
        build: build parameters (resize mode, exclusions, seed...).
        stats: counts (per source/label/split, duplicates, skips by reason).
    """

    version: int
    channels: int
    image_size: int
    shards: list[ShardInfo]
    sources: list[dict[str, Any]]
    label_names: list[str]
    build: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        """Total images over all shards."""
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        """Serialise to JSON text."""
        d = self.__dict__ | {"shards": [s.__dict__ for s in self.shards], "num_images": self.num_images}
        return json.dumps(d, indent=1, sort_keys=False)

    @classmethod
    def load(cls, root: str | Path) -> CorpusManifest:
        """Read ``root/manifest.json``; clear errors for a missing, damaged or incomplete file or an
        unknown version."""
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"no corpus manifest at {path}: build one with `openmednet corpus build SOURCE... --out {root}`"
            )
        try:
            d = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}): the corpus manifest is damaged; rebuild the corpus") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} holds {type(d).__name__}, not a corpus manifest: rebuild the corpus")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"corpus {root} has format version {d.get('version')}, this OpenMedNet reads {FORMAT_VERSION}: "
                "rebuild the corpus with this version"
            )
        d.pop("num_images", None)
        try:
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            return cls(**d)
        except (KeyError, TypeError) as e:  # a field missing or unknown: was "error: shards"
            raise ValueError(f"{path} is not a complete corpus manifest ({type(e).__name__}: {e}): rebuild the "
                             f"corpus") from None

    def save(self, root: str | Path) -> None:
        """Write ``root/manifest.json`` atomically."""
        atomic_write_text(Path(root) / MANIFEST, self.to_json())


def write_shard(
    root: Path,
    index: int,
    images: np.ndarray,
    meta: dict[str, np.ndarray],
    records: Sequence[dict[str, Any]],
) -> ShardInfo:
    """Write one shard atomically (temporary directory, then rename).

    Args:
        root: corpus directory.
        index: shard number.
        images: ``(N, C, S, S)`` uint8.
        meta: arrays of length ``N`` for every key of ``META_FIELDS``.
        records: ``N`` JSON-serialisable provenance dicts.
    """
    n = len(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"shard images must be uint8 (N, C, S, S), got {images.dtype} {images.shape}")
    missing = set(META_FIELDS) - set(meta)
    if missing:
        raise KeyError(f"shard meta lacks fields {sorted(missing)}")
    if len(records) != n or any(len(meta[k]) != n for k in META_FIELDS):
        raise ValueError("shard images, meta arrays and records must have the same length")
    final = root / shard_name(index)
    tmp = root / f"{shard_name(index)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "images.npy", np.ascontiguousarray(images))
    np.savez(tmp / "meta.npz", **{k: np.asarray(meta[k], dtype=t) for k, t in META_FIELDS.items()})
    (tmp / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return ShardInfo(shard_name(index), n)


def complete_shards(root: Path) -> list[int]:
    """Indices of complete shard directories under ``root`` (temporary ones are ignored)."""
    out = []
    for p in Path(root).glob("shard-?????"):
        if p.is_dir() and (p / "images.npy").is_file():
            out.append(int(p.name.split("-")[1]))
    return sorted(out)


class CorpusArrays:
    """Read access to a built corpus: memory-mapped images plus in-RAM integer metadata.

    Images are opened lazily per process (safe with forked DataLoader workers) and never loaded
    whole; the metadata arrays (a few bytes per image) are concatenated in RAM for samplers.

    Attributes:
        manifest: the corpus manifest.
        label, source, split, group, phash: ``(N,)`` arrays over the whole corpus.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = CorpusManifest.load(self.root)
        metas = [np.load(self.root / s.name / "meta.npz") for s in self.manifest.shards]
        for key, dtype in META_FIELDS.items():
            arrays = [m[key] for m in metas]
            setattr(self, key, np.concatenate(arrays) if arrays else np.zeros(0, dtype))
        counts = [s.count for s in self.manifest.shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> ``(shard number, index inside the shard)``."""
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for a corpus of {len(self)}")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return shard, int(index - self._starts[shard])

    def _images(self, shard: int) -> np.ndarray:
        arr = self._maps.get(shard)
        if arr is None:
            arr = np.load(self.root / self.manifest.shards[shard].name / "images.npy", mmap_mode="r")
            self._maps[shard] = arr
        return arr

    def image(self, index: int) -> np.ndarray:
        """``(C, S, S)`` uint8 copy of image ``index``."""
        shard, local = self.locate(index)
        return np.array(self._images(shard)[local])

    def records(self, shard: int) -> list[dict[str, Any]]:
        """Provenance records of one shard (read from disk each call)."""
        path = self.root / self.manifest.shards[shard].name / "records.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def iter_records(self) -> Iterable[dict[str, Any]]:
        """Provenance records of the whole corpus, in index order."""
        for shard in range(len(self.manifest.shards)):
            yield from self.records(shard)

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are reopened in each worker process instead of being pickled.
        return self.__dict__ | {"_maps": {}}
