"""Stage 2 of a build, decode: plan items -> routed, square, hashed uint8 images in chunk files.

``process_chunk`` runs in the worker processes (``_pool.run_isolated``): it decodes each item,
skips images without content (``MIN_SIDE``, blank), applies the corpus channel rule (routing by
content, ``GRAY_TOLERANCE``), resizes and hashes. The build process stores each result as
``chunks/chunk-XXXXX.npz`` atomically; a resumed build decodes only the chunks not on disk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from openmednet.data import dedupe
from openmednet.data.corpus._plan import ProgressFn, item_from_json, source_roots
from openmednet.data.corpus._pool import run_isolated
from openmednet.data.images import is_gray_content, resize_to_square, to_channels
from openmednet.data.readers import SkipImage
from openmednet.data.sources import SourceSpec, read_item
from openmednet.utils import atomic_write

#: Largest per-pixel channel spread (max - min over R, G, B) still routed as gray: JPEG chroma
#: noise on gray content saved as RGB reaches a few levels (brain_mri_yes_no: up to 5), while
#: the palest colour source here (chula_rbc12 smears) spreads at least 15.
GRAY_TOLERANCE = 8
#: Shortest image side a corpus takes: below it an image holds no structure at any corpus size
#: (>= 8 px), and a 1x1 "image" is padding, not data. MedMNIST's 28 px is well above.
MIN_SIDE = 8
#: Decoded pixels held for one hashing batch (about 256 images of 128 px; bounds a worker's
#: memory when one item yields many large frames, e.g. a NIfTI volume).
_HASH_BATCH_PIXELS = 1 << 22


@dataclass(frozen=True)
class DecodeOptions:
    """How a worker turns decoded images into corpus images."""

    channels: int | None  # None: no routing (exclusion targets): convert to ``convert_to``
    convert_to: int
    image_size: int
    resize_mode: str
    gray_tolerance: int


@lru_cache(maxsize=8)
def _file_sha1_cached(path: str, mtime_ns: int, size: int) -> str:
    # Multi-frame files (NIfTI volumes, .npz arrays) are hashed once per worker, not per frame.
    return dedupe.sha1_file(path)


def _file_key(path: Path, frame_tag: str) -> str:
    st = path.stat()
    base = _file_sha1_cached(str(path), st.st_mtime_ns, st.st_size)
    return base if frame_tag in ("", "0") else hashlib.sha1(f"{base}#{frame_tag}".encode()).hexdigest()


def _check_content(arr: np.ndarray) -> None:
    """Skip images that carry nothing to learn: a side under ``MIN_SIDE`` (``"too_small"``) or every
    pixel equal (``"blank_image"``; NIfTI and DICOM frames get their own ``"empty_slice"`` test)."""
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise SkipImage("too_small", f"{w}x{h} image; the corpus takes sides of at least {MIN_SIDE} pixels")
    flat = arr.reshape(h * w, -1)
    if bool((flat == flat[0]).all()):
        raise SkipImage("blank_image", f"every pixel equals {flat[0].tolist()}: a blank image")


def _route(arr: np.ndarray, hint: int | None, opts: DecodeOptions) -> np.ndarray:
    """Apply the corpus channel rule; raises ``SkipImage("wrong_channels")`` for the other family."""
    if opts.channels is None:
        return to_channels(arr, opts.convert_to)[0]
    gray = hint == 1 if hint is not None else is_gray_content(arr, tol=opts.gray_tolerance)
    if gray != (opts.channels == 1):
        kind = "gray" if gray else "colour"
        raise SkipImage("wrong_channels", f"{kind} image in a {opts.channels}-channel corpus")
    return to_channels(arr, opts.channels)[0]


def process_chunk(
    items: list[dict[str, Any]],
    reader_options: dict[str, dict[str, Any]],
    hints: dict[str, int | None],
    opts: DecodeOptions,
    roots: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """Decode, route, normalise and hash a chunk of plan items (worker side).

    ``roots`` maps a source to the folder its files must resolve inside (``None``: anywhere).

    Returns:
        ``images`` ``(n, C, S, S)`` uint8, ``phash`` ``(n,)`` uint64 and ``records``: one dict per
        image (provenance and hashes) or per skip (``{"skip": reason, ...}``), in plan order.
    """
    images, records = [], []
    # Hashing waits for a batch of decoded images (``dedupe.phashes`` shares its matrix products
    # and DCTs across them); ``pending`` holds (record index, decoded image) until then.
    pending: list[tuple[int, np.ndarray]] = []
    pending_pixels = 0
    for d in items:
        item = item_from_json(d, reader_options.get(d["source"], {}), (roots or {}).get(d["source"]))
        skips: list[SkipImage] = []
        try:
            for arr, meta in read_item(item, on_skip=skips.append):
                try:
                    _check_content(arr)
                    routed = _route(arr, hints.get(item.source), opts)
                except SkipImage as s:
                    skips.append(SkipImage(s.reason, s.message, item.path, meta.frame))
                    continue
                square = resize_to_square(routed, opts.image_size, opts.resize_mode)
                chw = square[None] if square.ndim == 2 else square.transpose(2, 0, 1)
                # frames of one file share its bytes: salt the file hash with the frame address
                frame_tag = f"{':'.join(map(str, item.frame))}" if isinstance(item.frame, tuple) else str(meta.frame)
                images.append(chw)
                pending.append((len(records), arr))
                pending_pixels += arr.shape[0] * arr.shape[1]
                records.append(
                    {
                        **d,
                        "frame": d["frame"] if d["frame"] is not None else meta.frame,
                        "modality": meta.modality or d["modality"],
                        "orig_shape": list(arr.shape),
                        "sha1": dedupe.sha1_pixels(square),
                        "sha1_file": _file_key(item.path, frame_tag),
                    }
                )
        except Exception as e:  # noqa: BLE001 - one bad file must never abort a build
            skips.append(SkipImage("read_error", f"{type(e).__name__}: {e}", item.path))
        for s in skips:
            records.append(
                {"skip": s.reason, "message": s.message, "source": d["source"], "path": d["path"], "frame": s.frame}
            )
        # Outside the item's error handler: the batch holds earlier items' images, so a hashing
        # failure is not this file's fault and must not be recorded as its read_error.
        if pending_pixels >= _HASH_BATCH_PIXELS:
            _hash_pending(pending, records)
            pending_pixels = 0
    _hash_pending(pending, records)
    return {
        "images": np.stack(images) if images else _no_images(opts),
        "phash": np.array([int(r["phash"], 16) for r in records if "skip" not in r], dtype=np.uint64),
        "records": records,
    }


def _hash_pending(pending: list[tuple[int, np.ndarray]], records: list[dict[str, Any]]) -> None:
    """Hash the pending decoded images in one batch, store the hex hashes in their records and
    empty ``pending``."""
    if not pending:
        return
    coarse, fine = dedupe.phashes([a for _, a in pending])
    for (ri, _), h, f in zip(pending, coarse, fine):
        records[ri]["phash"] = f"{int(h):016x}"
        records[ri]["phash256"] = "".join(f"{int(v):016x}" for v in f)
    pending.clear()


def _no_images(opts: DecodeOptions) -> np.ndarray:
    c = opts.channels or opts.convert_to
    return np.zeros((0, c, opts.image_size, opts.image_size), np.uint8)


def _join_chunk(opts: DecodeOptions, items: list[dict[str, Any]], parts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """``join`` of ``run_isolated``: a chunk's result from its one-item results; an item that
    killed its process becomes a ``read_error`` skip."""
    crashed = {"skip": "read_error", "message": "the decoder crashed its process (segfault or out of memory)"}
    records = []
    for d, p in zip(items, parts):
        records += [crashed | {"source": d["source"], "path": d["path"], "frame": None}] if p is None else p["records"]
    images = [p["images"] for p in parts if p is not None and len(p["images"])]
    return {
        "images": np.concatenate(images) if images else _no_images(opts),
        "phash": np.concatenate([np.zeros(0, np.uint64)] + [p["phash"] for p in parts if p is not None]),
        "records": records,
    }


def save_chunk(path: Path, result: dict[str, Any]) -> None:
    """Store a ``process_chunk`` result atomically."""

    def write(f: Any) -> None:
        np.savez(f, images=result["images"], phash=result["phash"], records=np.array(json.dumps(result["records"])))

    atomic_write(path, write)


def load_chunk(path: Path, with_images: bool = True) -> dict[str, Any]:
    """A stored chunk (``images`` is ``None`` without ``with_images``)."""
    with np.load(path) as z:
        return {
            "images": z["images"] if with_images else None,
            "phash": z["phash"],
            "records": json.loads(str(z["records"])),
        }


def run_chunks(
    paths: list[Path],
    batches: Iterator[list[dict[str, Any]]],
    specs: Sequence[SourceSpec],
    hints: dict[str, int | None],
    opts: DecodeOptions,
    workers: int,
    stage: str,
    progress: ProgressFn | None,
) -> None:
    """Decode every chunk whose file is missing (``workers`` processes, see ``run_isolated``);
    ``batches`` are the chunks' items, read lazily from the plan; ``specs`` give each source's
    reader options and root; ``hints`` each source's ``channels`` hint."""
    reader_options, roots = source_roots(specs)
    total = len(paths)
    count = [sum(p.is_file() for p in paths)]
    if progress:
        progress(stage, count[0], total)

    def done(path: Path, result: dict[str, Any]) -> None:
        save_chunk(path, result)
        count[0] += 1
        if progress:
            progress(stage, count[0], total)

    todo = ((p, items) for p, items in zip(paths, batches) if not p.is_file())
    run_isolated(todo, process_chunk, (reader_options, hints, opts, roots), workers, done, partial(_join_chunk, opts))
