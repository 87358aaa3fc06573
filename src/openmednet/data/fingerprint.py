"""Corpus fingerprints: the perceptual hashes of a pre-training corpus, small enough to ship.

A model pre-trained on a corpus can only be evaluated fairly on images that were not in that
corpus. Users of shipped weights do not have the corpus (hundreds of MB), so the weights travel
with a fingerprint of it: ``<arch>.<tag>.corpus.npz`` next to ``<arch>.<tag>.safetensors``.

File layout (``np.savez``, no pickled objects, readable with ``allow_pickle=False``):

================ ============ ================================================================
key              dtype/shape  content
================ ============ ================================================================
``phash``        uint64 (N,)  64-bit pHash of every corpus image, in corpus order (``meta.npz``)
``phash256``     uint64 (N,4) its 256-bit pHash (``records.jsonl``), which confirms 64-bit
                              candidates: 28 px chest X-rays share coarse structure without
                              being copies; ``(0, 4)`` when the corpus records lack it
``source``       int16 (N,)   index into ``source_names`` per image
``source_names`` str (S,)     the corpus' source names (``manifest.sources[*].name``)
``source_counts``int64 (S,)   images per source
``facts``        str ()       JSON: format version, channels, image size, image count, the sha256
                              of ``manifest.json``, the build's exclusions and thresholds
================ ============ ================================================================

About 42 bytes per image: the 14k-image gray corpus fingerprints in ~600 kB.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openmednet.data.shards import MANIFEST, CorpusArrays
from openmednet.utils import atomic_write

__all__ = [
    "FINGERPRINT_SUFFIX",
    "FINGERPRINT_VERSION",
    "CorpusFingerprint",
    "load_corpus_fingerprint",
    "pretraining_hashes",
    "save_corpus_fingerprint",
]

FINGERPRINT_VERSION = 1
#: File name ending of a fingerprint written next to weights: ``<arch>.<tag>.corpus.npz``.
FINGERPRINT_SUFFIX = ".corpus.npz"
_KEYS = ("phash", "phash256", "source", "source_names", "source_counts", "facts")


@dataclass(frozen=True)
class CorpusFingerprint:
    """What a fingerprint file holds (see the module docstring).

    Attributes:
        phash: ``(N,)`` uint64 pHashes of the corpus images.
        phash256: ``(N, 4)`` uint64 256-bit pHashes, or ``(0, 4)`` when the corpus lacks them.
        source: ``(N,)`` int16 source index of each image.
        source_names: source names, indexed by ``source``.
        facts: key facts of the corpus manifest (``num_images``, ``manifest_sha256``, ``exclude``...).
    """

    phash: np.ndarray
    phash256: np.ndarray
    source: np.ndarray
    source_names: tuple[str, ...]
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def source_counts(self) -> dict[str, int]:
        """Images per source name."""
        counts = np.bincount(self.source.astype(np.int64), minlength=len(self.source_names))
        return {name: int(c) for name, c in zip(self.source_names, counts, strict=True)}


def _manifest_facts(arrays: CorpusArrays) -> dict[str, Any]:
    """The manifest facts worth keeping once the corpus itself is gone."""
    m = arrays.manifest
    build = m.build
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "corpus_name": arrays.root.resolve().name,
        "corpus_format_version": m.version,
        "manifest_sha256": hashlib.sha256((arrays.root / MANIFEST).read_bytes()).hexdigest(),
        "channels": m.channels,
        "image_size": m.image_size,
        "num_images": m.num_images,
        "near_threshold": build.get("near_threshold"),
        # Exclusions say which targets the corpus was cleaned against: names only, the roots are
        # paths on the builder's machine.
        "exclude": [e.get("name") for e in build.get("exclude", [])],
    }


def _fine_hashes(arrays: CorpusArrays) -> np.ndarray:
    """``(N, 4)`` uint64 256-bit pHashes from the records (hex strings), ``(0, 4)`` if any is missing."""
    hexes = [r.get("phash256") for r in arrays.iter_records()]
    if not hexes or any(h is None or len(h) != 64 for h in hexes):
        return np.zeros((0, 4), np.uint64)
    return np.array([[int(h[k:k + 16], 16) for k in range(0, 64, 16)] for h in hexes], dtype=np.uint64)


def save_corpus_fingerprint(corpus_dir: str | Path, path: str | Path) -> CorpusFingerprint:
    """Write the fingerprint of a built corpus to ``path`` (atomically).

    Args:
        corpus_dir: directory written by ``openmednet corpus build``.
        path: destination, by convention ``<weights stem>.corpus.npz`` next to the weights.

    Returns:
        The fingerprint that was written.

    Raises:
        FileNotFoundError: ``corpus_dir`` has no ``manifest.json``.
        ValueError: the corpus has another storage version.
    """
    arrays = CorpusArrays(corpus_dir)
    names = tuple(s["name"] for s in arrays.manifest.sources)
    fp = CorpusFingerprint(
        phash=np.asarray(arrays.phash, dtype=np.uint64),
        phash256=_fine_hashes(arrays),
        source=np.asarray(arrays.source, dtype=np.int16),
        source_names=names,
        facts=_manifest_facts(arrays),
    )
    counts = np.array(list(fp.source_counts.values()), dtype=np.int64)

    def write(f: Any) -> None:
        np.savez(f, phash=fp.phash, phash256=fp.phash256, source=fp.source, source_names=np.array(names, dtype=str),
                 source_counts=counts, facts=np.array(json.dumps(fp.facts, sort_keys=True)))

    atomic_write(Path(path), write)
    return fp


def load_corpus_fingerprint(path: str | Path) -> CorpusFingerprint:
    """Read a fingerprint written by :func:`save_corpus_fingerprint`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a fingerprint file, an unsupported version, or inconsistent arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus fingerprint not found: {path} (expected a *{FINGERPRINT_SUFFIX} file)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in _KEYS if k in z.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # not an npz, truncated, pickled
        raise ValueError(f"{path} is not a readable .npz corpus fingerprint ({e}); write it again") from None
    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise ValueError(
            f"{path} is not a corpus fingerprint: keys {missing} are missing (has {sorted(data)}); "
            f"write one with save_corpus_fingerprint(corpus_dir, path)"
        )
    facts = json.loads(str(data["facts"]))
    if facts.get("fingerprint_version") != FINGERPRINT_VERSION:
        raise ValueError(
            f"{path}: fingerprint version {facts.get('fingerprint_version')!r} is not supported "
            f"(expected {FINGERPRINT_VERSION}); upgrade openmednet or write the fingerprint again"
        )
    fp = CorpusFingerprint(
        phash=data["phash"].astype(np.uint64, copy=False), phash256=data["phash256"].astype(np.uint64, copy=False),
        source=data["source"],
        source_names=tuple(str(s) for s in data["source_names"]), facts=facts,
    )
    stored = [int(c) for c in data["source_counts"]]
    fine_ok = fp.phash256.ndim == 2 and fp.phash256.shape[1] == 4 and len(fp.phash256) in (0, len(fp.phash))
    if len(fp.phash) != len(fp.source) or not fine_ok or list(fp.source_counts.values()) != stored:
        raise ValueError(
            f"{path} is inconsistent: {len(fp.phash)} hashes, {fp.phash256.shape} 256-bit hashes, "
            f"{len(fp.source)} source indices, source counts "
            f"{stored} vs {list(fp.source_counts.values())}; the file is damaged, write it again"
        )
    return fp


def pretraining_hashes(corpus: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """pHashes of a pre-training corpus, from its directory or its fingerprint file.

    Returns:
        ``(phash, phash256)``: ``(N,)`` uint64 64-bit hashes and ``(N, 4)`` uint64 256-bit hashes,
        the latter ``None`` when the corpus does not store them.

    Raises:
        FileNotFoundError: ``corpus`` is neither a corpus directory (``manifest.json``) nor a file.
    """
    corpus = Path(corpus)
    if corpus.is_dir():
        if not (corpus / MANIFEST).is_file():
            raise FileNotFoundError(
                f"pre-training corpus not found: {corpus} has no {MANIFEST} (expected a directory built by "
                f"`openmednet corpus build`, or a *{FINGERPRINT_SUFFIX} fingerprint file)"
            )
        arrays = CorpusArrays(corpus)
        phash, fine = np.asarray(arrays.phash, dtype=np.uint64), _fine_hashes(arrays)
    elif corpus.is_file():
        fp = load_corpus_fingerprint(corpus)
        phash, fine = fp.phash, fp.phash256
    else:
        raise FileNotFoundError(
            f"pre-training corpus not found: {corpus} (expected a corpus directory or a *{FINGERPRINT_SUFFIX} "
            f"fingerprint file)"
        )
    return phash, (fine if len(fine) == len(phash) and len(phash) else None)
