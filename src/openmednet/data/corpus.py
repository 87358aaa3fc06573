"""The corpus builder: many image sources -> one de-duplicated, leakage-free, sharded corpus.

``build_corpus`` runs in four resumable stages, all under ``out_dir/.build/``:

1. **Plan.** Enumerate every source (no pixels decoded) into ``plan.jsonl`` with the build
   parameters in ``params.json``, both written atomically. The plan fixes the item order; a
   restarted build reuses it and refuses to continue with different parameters. A census of
   the plan (``census.json``: items and test-split items per source, the channel family of
   ``CHANNEL_SAMPLE`` decoded items per source) resolves ``channels="auto"``, refuses explicit
   channels that would skip most images, and warns about sources that look like targets.
   Before any of it, a source that is an exclusion target is refused (``check_sources``).
2. **Decode.** The plan is cut into chunks of ``CHUNK_ITEMS`` items; a pool of ``workers``
   processes (which die with the build, even on SIGKILL) decodes, skips tiny and blank
   images, routes by channel content, normalises and hashes each chunk
   (``_process_chunk``) and the parent stores the result as ``chunks/chunk-XXXXX.npz``
   (atomically). Chunks already on disk are not decoded again. Exclusion targets are hashed the
   same way into ``targets.npz``.
3. **Decide.** From the small per-image hash table only (never the pixels): drop images matching
   an excluded target, collapse exact duplicates, assign the corpus split, drop evaluation-side
   near copies of training images (``decide``). Order-independent and deterministic.
4. **Write.** Stream the chunks in plan order and write the kept images into shards of
   ``shard_size`` (``openmednet.data.shards.write_shard``: temporary directory, then rename).
   Complete shards of an interrupted run are skipped. The manifest is written last, then
   ``report.md`` and its plots, then the ``.build`` work files are removed.

Memory stays flat in the corpus size: the parent holds one chunk of pixels and one shard buffer,
plus about 60 bytes of hashes and ids per image.

Splitting across machines: ``num_parts=K, part=i`` builds the items whose
``(source, group or path)`` hashes to ``i`` modulo ``K`` (so a patient's images stay in one
part); ``merge_parts`` then joins the part corpora and repeats exact and cross-split near
de-duplication across parts. See docs/corpus.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from openmednet.data import dedupe
from openmednet.data.curation import (
    Decision,
    ImageTable,
    TableBuilder,
    TargetHashes,
    decide,
    match_targets,
    normalise_split,
    stable_u64,
)
from openmednet.data.images import is_gray_content, resize_to_square, to_channels
from openmednet.data.readers import SkipImage
from openmednet.data.readers.base import printable_path
from openmednet.data.shards import (
    FORMAT_VERSION,
    SPLITS,
    CorpusArrays,
    CorpusManifest,
    ShardInfo,
    complete_shards,
    write_shard,
)
from openmednet.data.sources import SourceItem, SourceSpec, iter_source, read_item
from openmednet.utils import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

#: Items per decode task: small enough to balance 2-64 workers and to lose little work on a kill.
CHUNK_ITEMS = 64
#: Largest per-pixel channel spread (max - min over R, G, B) still routed as gray: JPEG chroma
#: noise on gray content saved as RGB reaches a few levels (brain_mri_yes_no: up to 5), while
#: the palest colour source here (chula_rbc12 smears) spreads at least 15.
GRAY_TOLERANCE = 8
#: Shortest image side a corpus takes: below it an image holds no structure at any corpus size
#: (>= 8 px), and a 1x1 "image" is padding, not data. MedMNIST's 28 px is well above.
MIN_SIDE = 8

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called as stages advance (stage names: plan, targets, decode,
write)."""

_BUILD_DIR = ".build"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: Items per source decoded (evenly spaced in plan order) to choose or check the corpus channels.
CHANNEL_SAMPLE = 16


class CorpusWarning(UserWarning):
    """A build that runs but is probably not what was meant (a target next to the sources, a
    source holding a test split, a source of the other channel family)."""


# --- plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildParams:
    """Everything that determines a build's output (compared on resume)."""

    channels: int | str  # as requested: 1, 3 or "auto" (the resolved value is in the manifest)
    image_size: int
    resize_mode: str
    near_threshold: int
    seed: int
    shard_size: int
    num_parts: int
    part: int
    gray_tolerance: int
    sources: list[dict[str, Any]]
    exclude: list[dict[str, Any]]
    confirm_threshold: int = dedupe.DEFAULT_CONFIRM_THRESHOLD
    chunk_items: int = CHUNK_ITEMS
    format_version: int = FORMAT_VERSION


def _spec_dict(spec: SourceSpec) -> dict[str, Any]:
    d = {
        "name": spec.name,
        "root": str(Path(spec.root).resolve()),
        "format": spec.format,
        "modality": spec.modality,
        "license": spec.license,
        "channels": spec.channels,
        "reader_options": dict(spec.reader_options),
    }
    # only when set, so that the parameters (and manifests) of existing builds stay the same
    return d | ({"allow_outside_root": True} if spec.allow_outside_root else {})


def _item_part(item: SourceItem, num_parts: int) -> int:
    unit = f"{item.source}/{item.group}" if item.group else f"{item.source}/{item.path}"
    return zlib.crc32(unit.encode("utf-8", "surrogateescape")) % num_parts


def _item_to_json(item: SourceItem) -> dict[str, Any]:
    return {
        "path": str(item.path),
        "frame": list(item.frame) if isinstance(item.frame, tuple) else item.frame,
        "label": item.label,
        "split": item.split,
        "group": item.group,
        "source": item.source,
        "modality": item.modality,
    }


def _item_from_json(d: dict[str, Any], reader_options: dict[str, Any], root: str | None = None) -> SourceItem:
    frame = tuple(d["frame"]) if isinstance(d["frame"], list) else d["frame"]
    return SourceItem(
        path=Path(d["path"]),
        frame=frame,
        label=d["label"],
        split=d["split"],
        group=d["group"],
        source=d["source"],
        modality=d["modality"],
        reader_options=reader_options,
        root=None if root is None else Path(root),
    )


def _write_plan(path: Path, specs: Sequence[SourceSpec], num_parts: int, part: int, progress: ProgressFn | None) -> int:
    """Enumerate ``specs`` into a JSON-lines plan (atomically); returns the number of items."""
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        for spec in specs:
            for item in iter_source(spec):
                if num_parts > 1 and _item_part(item, num_parts) != part:
                    continue
                f.write((json.dumps(_item_to_json(item)) + "\n").encode())
                count += 1
                if progress and count % 1000 == 0:
                    progress("plan", count, 0)

    atomic_write(path, write)
    return count


def _plan_chunks(
    path: Path, chunk_dir: Path, prefix: str, chunk_items: int
) -> tuple[list[Path], Iterator[list[dict[str, Any]]]]:
    """The chunk files of a plan and a lazy iterator over its items in chunks (never all in RAM)."""
    with open(path, "rb") as f:
        n_items = sum(1 for _ in f)
    paths = [chunk_dir / f"{prefix}-{k:05d}.npz" for k in range(-(-n_items // chunk_items))]

    def batches() -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                batch.append(json.loads(line))
                if len(batch) == chunk_items:
                    yield batch
                    batch = []
        if batch:
            yield batch

    return paths, batches()


# --- source checks and channels ------------------------------------------------------------------


def check_sources(sources: Sequence[SourceSpec], exclude: Sequence[SourceSpec]) -> None:
    """Refuse a source that is an exclusion target (or lies inside one); warn about near misses.

    ``--exclude A B C`` on a command line excludes A and makes B and C *sources*; listing a target
    as a source is exactly the leak exclusion exists to prevent. A source in the same folder as a
    target (``targets/busi`` next to ``targets/mias``) gets a ``CorpusWarning``.

    Raises:
        ValueError: a source root equals a target root or lies inside it.
    """
    for s in sources:
        src = Path(s.root).resolve()
        for t in exclude:
            tgt = Path(t.root).resolve()
            if src == tgt or tgt in src.parents:
                raise ValueError(
                    f"source '{s.name}' ({s.root}) is {'inside ' if src != tgt else ''}the exclusion target "
                    f"'{t.name}' ({t.root}); a target must never be a pre-training source: drop it from the sources "
                    "(several targets: --exclude A,B,C; '--exclude A B C' makes B and C sources)"
                )
            if src in tgt.parents:
                _warn(f"source '{s.name}' ({s.root}) contains the exclusion target '{t.name}': its copies are "
                      "excluded by hash, but point the source at its own files")
            elif src.parent == tgt.parent:
                _warn(f"source '{s.name}' ({s.root}) sits next to the exclusion target '{t.name}' in {src.parent}: "
                      "if it is a target too, exclude it (--exclude A,B,C; '--exclude A B C' makes B and C sources)")


def _warn(message: str) -> None:
    warnings.warn(message, CorpusWarning, stacklevel=3)


def _census(plan_path: Path, specs: Sequence[SourceSpec], gray_tolerance: int) -> dict[str, dict[str, int]]:
    """Per source: plan items, items in a test split, and gray/colour counts of an evenly spaced
    sample of ``CHANNEL_SAMPLE`` items (first image of each; unreadable ones left out)."""
    by_name = {s.name: s for s in specs}
    counts = {n: {"items": 0, "test": 0, "gray": 0, "colour": 0} for n in by_name}
    with open(plan_path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if d["source"] in counts:
                counts[d["source"]]["items"] += 1
                counts[d["source"]]["test"] += normalise_split(d["split"]) == "test"
    picks = {
        n: {k * c["items"] // min(c["items"], CHANNEL_SAMPLE) for k in range(min(c["items"], CHANNEL_SAMPLE))}
        for n, c in counts.items()
    }
    seen = dict.fromkeys(counts, 0)
    with open(plan_path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            name = d["source"]
            if name not in counts:
                continue
            seen[name] += 1
            if seen[name] - 1 in picks[name]:
                gray = _sample_is_gray(d, by_name[name], gray_tolerance)
                if gray is not None:
                    counts[name]["gray" if gray else "colour"] += 1
    return counts


def _sample_is_gray(d: dict[str, Any], spec: SourceSpec, gray_tolerance: int) -> bool | None:
    """Whether an item's first image is gray (the source's hint wins); ``None`` if unreadable."""
    if spec.channels is not None:
        return spec.channels == 1
    root = None if spec.allow_outside_root else str(spec.root)
    try:
        for arr, _ in read_item(_item_from_json(d, dict(spec.reader_options), root), on_skip=lambda s: None):
            return is_gray_content(arr, tol=gray_tolerance)
    except Exception:  # noqa: BLE001 - the decode stage reports this file; the sample only skips it
        return None
    return None


def _resolve_channels(requested: int | str, census: dict[str, dict[str, int]]) -> int:
    """The corpus channels: ``requested`` (1 or 3), or for ``"auto"`` the family of most images.

    Sources of the other family get a ``CorpusWarning`` (their images will be skipped as
    ``wrong_channels``).

    Raises:
        ValueError: explicit channels under which most of the input would be skipped.
    """
    est = {"gray": 0.0, "colour": 0.0}
    for c in census.values():
        sampled = c["gray"] + c["colour"]
        for kind in est:
            est[kind] += c["items"] * c[kind] / sampled if sampled else 0.0
    channels = (1 if est["gray"] >= est["colour"] else 3) if requested == "auto" else int(requested)
    other = "colour" if channels == 1 else "gray"
    total = est["gray"] + est["colour"]
    if requested != "auto" and total and est[other] > total / 2:
        wrong = sorted(n for n, c in census.items() if c[other] > c["gray" if other == "colour" else "colour"])
        raise ValueError(
            f"channels={channels}: about {est[other]:,.0f} of {total:,.0f} images are {other} (sampled "
            f"{CHANNEL_SAMPLE} per source; mostly {other}: {', '.join(wrong)}) and would be skipped as "
            f"wrong_channels; build with channels={4 - channels} or 'auto' (--channels {4 - channels}/auto)"
        )
    for name, c in census.items():
        if c[other] > c["gray" if other == "colour" else "colour"]:
            _warn(f"source '{name}' looks {other} ({c[other]} of {c['gray'] + c['colour']} sampled images): "
                  f"its {other} images are skipped as wrong_channels in this {channels}-channel corpus")
    return channels


def _warn_test_splits(census: dict[str, dict[str, int]]) -> None:
    for name, c in census.items():
        if c["test"]:
            _warn(f"source '{name}' holds {c['test']:,} images in a test split: if it is an evaluation target, "
                  "pass it to --exclude instead of as a source")


# --- decode (runs in worker processes) ----------------------------------------------------------


@dataclass(frozen=True)
class _DecodeOptions:
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


def _route(arr: np.ndarray, hint: int | None, opts: _DecodeOptions) -> np.ndarray:
    """Apply the corpus channel rule; raises ``SkipImage("wrong_channels")`` for the other family."""
    if opts.channels is None:
        return to_channels(arr, opts.convert_to)[0]
    gray = hint == 1 if hint is not None else is_gray_content(arr, tol=opts.gray_tolerance)
    if gray != (opts.channels == 1):
        kind = "gray" if gray else "colour"
        raise SkipImage("wrong_channels", f"{kind} image in a {opts.channels}-channel corpus")
    return to_channels(arr, opts.channels)[0]


def _process_chunk(
    items: list[dict[str, Any]],
    reader_options: dict[str, dict[str, Any]],
    hints: dict[str, int | None],
    opts: _DecodeOptions,
    roots: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """Decode, route, normalise and hash a chunk of plan items (worker side).

    ``roots`` maps a source to the folder its files must resolve inside (``None``: anywhere).

    Returns:
        ``images`` ``(n, C, S, S)`` uint8, ``phash`` ``(n,)`` uint64 and ``records``: one dict per
        image (provenance and hashes) or per skip (``{"skip": reason, ...}``), in plan order.
    """
    images, phashes, records = [], [], []
    for d in items:
        item = _item_from_json(d, reader_options.get(d["source"], {}), (roots or {}).get(d["source"]))
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
                phashes.append(dedupe.phash64(arr))
                fine = dedupe.phash256(arr)
                records.append(
                    {
                        **d,
                        "frame": d["frame"] if d["frame"] is not None else meta.frame,
                        "modality": meta.modality or d["modality"],
                        "orig_shape": list(arr.shape),
                        "sha1": dedupe.sha1_pixels(square),
                        "sha1_file": _file_key(item.path, frame_tag),
                        "phash": f"{phashes[-1]:016x}",
                        "phash256": "".join(f"{int(v):016x}" for v in fine),
                    }
                )
        except Exception as e:  # noqa: BLE001 - one bad file must never abort a build
            skips.append(SkipImage("read_error", f"{type(e).__name__}: {e}", item.path))
        for s in skips:
            records.append(
                {"skip": s.reason, "message": s.message, "source": d["source"], "path": d["path"], "frame": s.frame}
            )
    c = opts.channels or opts.convert_to
    arr = np.stack(images) if images else np.zeros((0, c, opts.image_size, opts.image_size), np.uint8)
    return {"images": arr, "phash": np.array(phashes, dtype=np.uint64), "records": records}


def _save_chunk(path: Path, result: dict[str, Any]) -> None:
    def write(f: Any) -> None:
        np.savez(f, images=result["images"], phash=result["phash"], records=np.array(json.dumps(result["records"])))

    atomic_write(path, write)


def _load_chunk(path: Path, with_images: bool = True) -> dict[str, Any]:
    with np.load(path) as z:
        return {
            "images": z["images"] if with_images else None,
            "phash": z["phash"],
            "records": json.loads(str(z["records"])),
        }


def _run_chunks(
    paths: list[Path],
    batches: Iterator[list[dict[str, Any]]],
    specs: Sequence[SourceSpec],
    hints: dict[str, int | None],
    opts: _DecodeOptions,
    workers: int,
    stage: str,
    progress: ProgressFn | None,
) -> None:
    """Decode every chunk whose file is missing (in a process pool); ``batches`` are the chunks'
    items, read lazily from the plan; ``specs`` give each source's reader options and root."""
    reader_options = {s.name: dict(s.reader_options) for s in specs}
    roots = {s.name: None if s.allow_outside_root else str(s.root) for s in specs}
    total = len(paths)
    todo = ((p, items) for p, items in zip(paths, batches) if not p.is_file())
    done = sum(p.is_file() for p in paths)
    if progress:
        progress(stage, done, total)
    if workers <= 1:
        for p, items in todo:
            _save_chunk(p, _process_chunk(items, reader_options, hints, opts, roots))
            done += 1
            if progress:
                progress(stage, done, total)
        return
    args = (reader_options, hints, opts, roots)
    count = [done]

    def tick() -> None:
        count[0] += 1
        if progress:
            progress(stage, count[0], total)

    while True:
        suspects = _pool_pass(todo, args, workers, tick)
        if not suspects:
            return
        # A worker died (a decoder crashed or ran out of memory): re-run the chunks that were in
        # flight item by item, each in its own process, so only the culprit is skipped.
        for p, items in suspects:
            _save_chunk(p, _isolated(items, args))
            tick()


def _worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool whose workers die with this process, even when it is killed with SIGKILL.

    A killed parent never shuts its pool down, and a forked worker blocked on the task queue
    never sees EOF (it holds the queue's write end itself): it would decode on, or wait, forever.
    """
    return ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),))


def _die_with_parent(parent: int) -> None:
    """Worker initializer: exit when ``parent`` dies (Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``;
    elsewhere a thread that polls the parent id once a second)."""
    if not _set_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watch").start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _set_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _pool_pass(
    todo: Iterator[tuple[Path, list[dict[str, Any]]]], args: tuple, workers: int, tick: Callable[[], Any]
) -> list[tuple[Path, list[dict[str, Any]]]]:
    """Run chunks in a process pool until done (returns ``[]``) or until a worker dies (returns
    the chunks that were in flight; ``todo`` keeps the rest)."""
    pending: dict[Future, tuple[Path, list[dict[str, Any]]]] = {}
    with _worker_pool(workers) as pool:
        while True:
            # keep at most 2 tasks per worker in flight so finished chunks never pile up in RAM
            while len(pending) < 2 * workers:
                nxt = next(todo, None)
                if nxt is None:
                    break
                pending[pool.submit(_process_chunk, nxt[1], *args)] = nxt
            if not pending:
                return []
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    logger.warning("a decoding process died; isolating the %d chunks in flight", len(pending))
                    return list(pending.values())
                _save_chunk(pending.pop(fut)[0], result)
                tick()


def _isolated(items: list[dict[str, Any]], args: tuple) -> dict[str, Any]:
    """Process each item in a fresh process; an item that kills its process becomes a skip."""
    parts = []
    for d in items:
        with _worker_pool(1) as pool:
            try:
                parts.append(pool.submit(_process_chunk, [d], *args).result())
            except BrokenProcessPool:
                skip = {"skip": "read_error", "message": "the decoder crashed its process (segfault or out of memory)"}
                parts.append(
                    {
                        "images": None,
                        "phash": np.zeros(0, np.uint64),
                        "records": [skip | {"source": d["source"], "path": d["path"], "frame": None}],
                    }
                )
    images = [p["images"] for p in parts if p["images"] is not None and len(p["images"])]
    opts: _DecodeOptions = args[2]
    c = opts.channels or opts.convert_to
    return {
        "images": np.concatenate(images) if images else np.zeros((0, c, opts.image_size, opts.image_size), np.uint8),
        "phash": np.concatenate([p["phash"] for p in parts]),
        "records": [r for p in parts for r in p["records"]],
    }


def target_spec(path: str | Path) -> SourceSpec:
    """A ``SourceSpec`` for an ``--exclude`` argument: a source folder (any layout ``auto``
    detects, e.g. with ``labels.csv``), or a MedMNIST ``.npz``; named after the folder/file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"exclusion target not found: {p} (expected a source folder or a .npz file)")
    name = p.stem if p.is_file() else p.name
    return SourceSpec(name=name, root=p)


def _hash_targets(
    specs: Sequence[SourceSpec], work: Path, opts: _DecodeOptions, workers: int, progress: ProgressFn | None
) -> TargetHashes:
    names = [s.name for s in specs]
    if not specs:
        z = np.zeros(0, np.uint64)
        return TargetHashes(names, np.zeros(0, np.int16), z, z, z, np.zeros((0, 4), np.uint64))
    tdir = work / "targets"
    tdir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    batches: list[Iterator[list[dict[str, Any]]]] = []
    for ti, spec in enumerate(specs):
        plan = tdir / f"plan-{ti:03d}.jsonl"
        if not plan.is_file():
            _write_plan(plan, [spec], 1, 0, None)
        p, b = _plan_chunks(plan, tdir, f"t{ti:03d}-chunk", CHUNK_ITEMS)
        paths += p
        batches.append(b)
    _run_chunks(paths, itertools.chain(*batches), specs, {s.name: None for s in specs}, opts, workers, "targets", progress)
    builder = TableBuilder()
    image_names: list[str] = []
    target_idx: list[np.ndarray] = []
    skipped: Counter[str] = Counter()
    for path in paths:
        ch = _load_chunk(path, with_images=False)
        recs = [r for r in ch["records"] if "skip" not in r]
        skipped.update(f"{r['source']}: {r['skip']}" for r in ch["records"] if "skip" in r)
        builder.add(recs, ch["phash"])
        image_names += [_image_name(r) for r in recs]
        target_idx.append(np.array([names.index(r["source"]) for r in recs], np.int16))
    table = builder.build()
    tgt = np.concatenate(target_idx) if target_idx else np.zeros(0, np.int16)
    return TargetHashes(
        names, tgt, table.phash, table.sha1, table.sha1_file, table.phash256, table, dict(skipped), image_names
    )


# --- write --------------------------------------------------------------------------------------


class _ShardWriter:
    """Buffers kept images and writes a shard every ``shard_size`` images, skipping shards that a
    previous run completed (their content is identical: same plan, same decisions)."""

    def __init__(
        self,
        root: Path,
        shard_size: int,
        channels: int,
        size: int,
        done: set[int],
        progress: ProgressFn | None,
        total: int,
    ):
        self.root, self.shard_size, self.done = root, shard_size, done
        self.shape = (channels, size, size)
        self.images: list[np.ndarray] = []
        self.meta: dict[str, list] = defaultdict(list)
        self.records: list[dict[str, Any]] = []
        self.shards: list[ShardInfo] = []
        self.progress, self.total, self.count = progress, total, 0

    def add(self, image: np.ndarray, meta: dict[str, Any], record: dict[str, Any]) -> None:
        index = len(self.shards)
        if index not in self.done:  # a complete shard's pixels are not needed again
            self.images.append(image)
            self.records.append(record)
        for k, v in meta.items():
            self.meta[k].append(v)
        self.count += 1
        if len(self.meta["label"]) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        n = len(self.meta["label"])
        if n == 0:
            return
        index = len(self.shards)
        if index in self.done:
            self.shards.append(ShardInfo(f"shard-{index:05d}", n))
        else:
            images = np.stack(self.images) if self.images else np.zeros((0, *self.shape), np.uint8)
            self.shards.append(
                write_shard(self.root, index, images, {k: np.array(v) for k, v in self.meta.items()}, self.records)
            )
        self.images, self.records, self.meta = [], [], defaultdict(list)
        if self.progress:
            self.progress("write", self.count, self.total)


def _meta_of(table: ImageTable, d: Decision, i: int) -> dict[str, Any]:
    return {
        "label": int(d.label[i]),
        "source": int(table.source[i]),
        "split": int(d.split[i]),
        "group": int(table.group[i] & np.uint64(0x7FFFFFFFFFFFFFFF)) if table.group[i] else -1,
        "phash": table.phash[i],
    }


def _final_record(r: dict[str, Any], table: ImageTable, d: Decision, i: int) -> dict[str, Any]:
    out = dict(r)
    out["source_split"] = r["source_split"] if "source_split" in r else r.get("split")
    out["split"] = SPLITS[d.split[i]]
    out["label"] = table.label_names[d.label[i]].split("/", 1)[1] if d.label[i] >= 0 else None
    if d.label_conflict[i]:
        out["label_conflict"] = True
        out["source_label"] = r.get("label")
    return out


# --- statistics ---------------------------------------------------------------------------------

_SIZE_BINS = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 1 << 30]


class _Stats:
    """Streaming counts for the report (per source, modality, label, split, sizes, skips)."""

    def __init__(self) -> None:
        self.per_source: Counter[str] = Counter()
        self.per_modality: Counter[str] = Counter()
        self.per_label: Counter[str] = Counter()
        self.per_split: Counter[str] = Counter()
        self.sizes: dict[str, list[int]] = defaultdict(lambda: [0] * (len(_SIZE_BINS) - 1))
        self.skipped: Counter[str] = Counter()
        self.skipped_by_source: dict[str, Counter[str]] = defaultdict(Counter)
        self.skip_examples: dict[str, list[str]] = defaultdict(list)
        self.dropped_by_source: dict[str, Counter[str]] = defaultdict(Counter)

    def kept(self, rec: dict[str, Any]) -> None:
        self.per_source[rec["source"]] += 1
        self.per_modality[rec.get("modality") or "unknown"] += 1
        self.per_label[f"{rec['source']}/{rec['label']}" if rec.get("label") else f"{rec['source']}/(unlabelled)"] += 1
        self.per_split[rec["split"]] += 1
        side = max(rec["orig_shape"][:2])
        self.sizes[rec["source"]][int(np.searchsorted(_SIZE_BINS, side, side="right")) - 1] += 1

    def skip(self, rec: dict[str, Any]) -> None:
        self.skipped[rec["skip"]] += 1
        self.skipped_by_source[rec["source"]][rec["skip"]] += 1
        if len(self.skip_examples[rec["skip"]]) < 5:
            # printable: a skipped file's name may be the undecodable bytes that caused the skip
            self.skip_examples[rec["skip"]].append(f"{printable_path(rec['path'])}: {rec.get('message', '')}"[:300])

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_source": dict(self.per_source),
            "per_modality": dict(self.per_modality),
            "per_label": dict(sorted(self.per_label.items())),
            "per_split": dict(self.per_split),
            "size_bins": _SIZE_BINS[:-1],
            "size_hist": {k: v for k, v in self.sizes.items()},
            "skipped": dict(self.skipped),
            "skipped_by_source": {k: dict(v) for k, v in self.skipped_by_source.items()},
            "skip_examples": dict(self.skip_examples),
            "dropped_by_source": {k: dict(v) for k, v in self.dropped_by_source.items()},
        }


# --- the build ----------------------------------------------------------------------------------


def _check_params(work: Path, params: BuildParams) -> None:
    """Store the parameters of a new build, or check that a resumed build uses the same ones."""
    path = work / "params.json"
    text = json.dumps(asdict(params), indent=1, sort_keys=True)
    if path.is_file():
        if path.read_text() != text:
            raise ValueError(
                f"{work.parent} holds an unfinished build with different parameters ({path}); "
                "resume it with the same arguments, or delete the directory / choose a new --out"
            )
        logger.info("resuming the unfinished build in %s", work.parent)
        return
    atomic_write_text(path, text)


def _validate(
    channels: int | str,
    image_size: int,
    resize_mode: str,
    shard_size: int,
    chunk_items: int,
    num_parts: int,
    part: int,
    sources: Sequence[SourceSpec],
) -> None:
    if channels not in (1, 3, "auto"):
        raise ValueError(f"channels must be 1 (gray corpus), 3 (colour corpus) or 'auto', got {channels!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if resize_mode not in ("pad", "crop"):
        raise ValueError(f"resize_mode must be 'pad' or 'crop', got {resize_mode!r}")
    if shard_size < 1 or chunk_items < 1:
        raise ValueError(f"shard_size and chunk_items must be positive, got {shard_size} and {chunk_items}")
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"part must be in [0, num_parts), got part={part} with num_parts={num_parts}")
    if num_parts > 1 and channels == "auto":
        raise ValueError("channels='auto' would let parts choose differently; give every part --channels 1 or 3")
    names = [s.name for s in sources]
    if not names:
        raise ValueError("no sources given: pass at least one source folder")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"source names must be unique, got duplicates {dup}: give them distinct names")


def build_corpus(
    sources: Sequence[SourceSpec],
    out_dir: str | Path,
    *,
    channels: Literal[1, 3, "auto"],
    image_size: int = 256,
    resize_mode: Literal["pad", "crop"] = "pad",
    exclude: Sequence[SourceSpec] = (),
    workers: int = 1,
    shard_size: int = 2048,
    num_parts: int = 1,
    part: int = 0,
    seed: int = 0,
    near_threshold: int = dedupe.DEFAULT_NEAR_THRESHOLD,
    confirm_threshold: int = dedupe.DEFAULT_CONFIRM_THRESHOLD,
    gray_tolerance: int = GRAY_TOLERANCE,
    chunk_items: int = CHUNK_ITEMS,
    keep_work_files: bool = False,
    progress: ProgressFn | None = None,
) -> CorpusManifest:
    """Build (or resume) a corpus from image sources.

    Args:
        sources: the sources to include (``SourceSpec``; names must be unique).
        out_dir: corpus directory (created; an unfinished build there is resumed).
        channels: 1 for a gray corpus, 3 for a colour corpus, ``"auto"`` for the family of most
            images (from ``CHANNEL_SAMPLE`` decoded items per source, weighted by the sources'
            sizes). Images are routed by content: an RGB file with equal channels (within
            ``gray_tolerance``) is gray; images of the other family are skipped with reason
            ``"wrong_channels"``. A source's ``channels`` hint, when set, overrides the content
            test. Explicit channels under which most of the input would be skipped are refused
            before decoding.
        image_size: side ``S`` of the stored ``(C, S, S)`` uint8 images.
        resize_mode: ``"pad"`` (whole image, longer side to ``S``, black borders) or ``"crop"``
            (shorter side to ``S``, centred crop); see ``openmednet.data.images.resize_to_square``.
        exclude: target sets whose images and near copies must never enter the corpus.
        workers: decoding processes (1 = in this process).
        shard_size: images per shard.
        num_parts, part: build only part ``part`` of ``num_parts`` (merge with ``merge_parts``).
        seed: seed of the split assignment for sources without splits.
        near_threshold: 64-bit phash Hamming threshold for near-duplicate candidates.
        confirm_threshold: 256-bit phash Hamming threshold confirming a candidate.
        gray_tolerance: channel spread still counted as gray content.
        chunk_items: plan items per decode task (the unit of parallelism and of resumption).
        keep_work_files: keep ``out_dir/.build`` (decoded chunks) after success.
        progress: optional ``progress(stage, done, total)`` callback.

    Returns:
        The manifest of the finished corpus (also in ``out_dir/manifest.json``; the report is in
        ``out_dir/report.md``).

    Warns:
        CorpusWarning: a source next to (or containing) a target, holding a test split, or of the
            other channel family (see ``check_sources``).

    Raises:
        ValueError: bad arguments, a source that is an exclusion target, explicit channels that
            would skip most images, or an unfinished build in ``out_dir`` with other parameters.
        FileNotFoundError: a source or target root does not exist.
    """
    _validate(channels, image_size, resize_mode, shard_size, chunk_items, num_parts, part, sources)
    check_sources(sources, exclude)
    out = Path(out_dir)
    work = out / _BUILD_DIR
    fresh = not (work / "params.json").is_file()
    work.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").is_file() and fresh:
        raise ValueError(f"{out} already holds a finished corpus; choose a new --out or delete it")
    params = BuildParams(
        channels, image_size, resize_mode, near_threshold, seed, shard_size, num_parts, part, gray_tolerance,
        [_spec_dict(s) for s in sources], [_spec_dict(s) for s in exclude], confirm_threshold, chunk_items,
    )  # fmt: skip
    _check_params(work, params)
    for tmp in out.glob("shard-?????.tmp"):  # half-written shards of a killed run
        shutil.rmtree(tmp, ignore_errors=True)

    plan_path = work / "plan.jsonl"
    if not plan_path.is_file():
        _write_plan(plan_path, sources, num_parts, part, progress)
    requested, channels = channels, _plan_channels(work, plan_path, sources, channels, gray_tolerance, fresh)
    opts = _DecodeOptions(channels, channels, image_size, resize_mode, gray_tolerance)
    targets = _hash_targets(
        exclude, work, _DecodeOptions(None, channels, image_size, resize_mode, gray_tolerance), workers, progress
    )

    chunk_dir = work / "chunks"
    chunk_dir.mkdir(exist_ok=True)
    chunk_paths, batches = _plan_chunks(plan_path, chunk_dir, "chunk", chunk_items)
    _run_chunks(chunk_paths, batches, sources, {s.name: s.channels for s in sources}, opts, workers, "decode", progress)

    builder = TableBuilder(source_names=[s.name for s in sources])
    for path in chunk_paths:
        ch = _load_chunk(path, with_images=False)
        builder.add([r for r in ch["records"] if "skip" not in r], ch["phash"])
    table = builder.build()
    matched, exclusion_counts, targets_found = match_targets(table, targets, near_threshold, confirm_threshold)
    decision = decide(
        table, near_threshold=near_threshold, confirm_threshold=confirm_threshold, seed=seed, excluded=matched
    )

    stats, shards = _write_corpus(out, chunk_paths, table, decision, channels, image_size, shard_size, progress)
    stats["exclusion"] = {
        "targets": exclusion_counts,
        "target_images": {n: int((targets.target == i).sum()) for i, n in enumerate(targets.names)},
        "target_images_found": targets_found,
        "target_skipped": targets.skipped,
    }
    if targets.table is not None:
        tdec = decide(targets.table, near_threshold=near_threshold, confirm_threshold=confirm_threshold, seed=seed)
        stats["exclusion"]["target_duplicates"] = {
            "exact": tdec.stats["exact"],
            "near": tdec.stats["near"],
            "label_conflicts": _describe_conflicts(tdec.stats["label_conflicts"], targets.image_names.__getitem__),
        }
    manifest = CorpusManifest(
        version=FORMAT_VERSION,
        channels=channels,
        image_size=image_size,
        shards=shards,
        sources=[_source_entry(s) for s in sources],
        label_names=table.label_names,
        build={k: v for k, v in asdict(params).items() if k not in ("sources",)}
        | {"decoded_images": len(table), "channels": channels}
        | ({"channels_requested": requested} if requested != channels else {}),
        stats=stats,
    )
    _finish(out, manifest, work, keep_work_files)
    return manifest


def _plan_channels(
    work: Path, plan_path: Path, sources: Sequence[SourceSpec], requested: int | str, gray_tolerance: int, fresh: bool
) -> int:
    """Resolve (``"auto"``) or check the channels once per build, from a census of the plan stored
    in ``.build/census.json``; a resumed build reuses it (same sample, same answer, no decoding).

    A refused first attempt removes its ``.build`` (parameters and plan only), so the command can
    be re-run at once with other channels.
    """
    path = work / "census.json"
    if path.is_file():
        return int(json.loads(path.read_text())["channels"])
    census = _census(plan_path, sources, gray_tolerance)
    try:
        channels = _resolve_channels(requested, census)
    except ValueError:
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
        raise
    _warn_test_splits(census)
    atomic_write_text(path, json.dumps({"channels": channels, "sources": census}, indent=1))
    return channels


def _source_entry(spec: SourceSpec) -> dict[str, Any]:
    d = _spec_dict(spec)
    return {
        "name": d["name"],
        "modality": d["modality"],
        "license": d["license"],
        "root": d["root"],
        "format": d["format"],
    }


def _image_name(r: dict[str, Any]) -> str:
    frame = r.get("frame")
    return f"{r['source']}:{r['path']}" + ("" if frame in (None, 0) else f"#{frame}")


def _describe_conflicts(conflicts: list[dict[str, Any]], name: Callable[[int], str]) -> list[dict[str, Any]]:
    """Label conflicts for the report: ``{"labels": [...], "images": ["source:path", ...]}``."""
    return [{"labels": c["labels"], "images": [name(i) for i in c["members"]]} for c in conflicts]


def _write_corpus(
    out: Path,
    chunk_paths: list[Path],
    table: ImageTable,
    decision: Decision,
    channels: int,
    image_size: int,
    shard_size: int,
    progress: ProgressFn | None,
) -> tuple[dict[str, Any], list[ShardInfo]]:
    """Stream the decoded chunks into shards; returns the statistics and the shard list."""
    fingerprint = hashlib.sha1(
        np.flatnonzero(decision.keep).tobytes() + decision.split.tobytes() + decision.label.tobytes()
    ).hexdigest()
    fp_path = out / _BUILD_DIR / "decision.sha1"
    done = set(complete_shards(out))
    if done and (not fp_path.is_file() or fp_path.read_text() != fingerprint):
        logger.warning("complete shards in %s come from other decisions; rewriting them", out)
        done = set()
    atomic_write_text(fp_path, fingerprint)
    writer = _ShardWriter(out, shard_size, channels, image_size, done, progress, int(decision.keep.sum()))
    stats = _Stats()
    in_conflict = {i for c in decision.stats.get("label_conflicts", []) for i in c["members"]}
    names: dict[int, str] = {}
    i = 0
    for path in chunk_paths:
        ch = _load_chunk(path)
        j = 0
        for r in ch["records"]:
            if "skip" in r:
                stats.skip(r)
                continue
            if table.key[i] != stable_u64(f"{r['source']}/{r['path']}#{r.get('frame')}"):
                raise RuntimeError(
                    f"chunk {path} does not match the decision table; delete {out / _BUILD_DIR} and rebuild"
                )
            if decision.keep[i]:
                rec = _final_record(r, table, decision, i)
                stats.kept(rec)
                writer.add(ch["images"][j], _meta_of(table, decision, i), rec)
            else:
                stats.dropped_by_source[r["source"]][decision.reason[i]] += 1
            if i in in_conflict:
                names[i] = _image_name(r)
            i += 1
            j += 1
    writer.flush()
    out_stats = stats.to_dict() | {k: v for k, v in decision.stats.items() if k != "label_conflicts"}
    out_stats["label_conflicts"] = _describe_conflicts(decision.stats.get("label_conflicts", []), names.__getitem__)
    return out_stats, writer.shards


def _finish(out: Path, manifest: CorpusManifest, work: Path, keep_work_files: bool) -> None:
    """Manifest last (a corpus is complete iff it has one), then the report, then clean up."""
    from openmednet.data.report import write_report

    manifest.save(out)
    write_report(manifest, out)
    if not keep_work_files:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("corpus %s: %d images in %d shards", out, manifest.num_images, len(manifest.shards))


# --- merge --------------------------------------------------------------------------------------


def merge_parts(
    parts: Sequence[str | Path],
    out_dir: str | Path,
    *,
    shard_size: int | None = None,
    near_threshold: int | None = None,
    progress: ProgressFn | None = None,
) -> CorpusManifest:
    """Join part corpora (``build_corpus(..., num_parts=K, part=i)``) into one corpus.

    Exact duplicates and cross-split near copies are removed again *across* parts with the rules
    of ``decide`` (each part only saw its own images); splits assigned by the parts are kept.
    Images are streamed shard by shard (flat memory); an interrupted merge resumes like a build.

    Args:
        parts: part corpus directories, in the order their images should appear.
        out_dir: the merged corpus directory.
        shard_size: images per merged shard (default: the first part's).
        near_threshold: phash threshold (default: the first part's).
        progress: optional ``progress(stage, done, total)`` callback.

    Raises:
        ValueError: parts with different channels, image size or format version, or none given.
    """
    if not parts:
        raise ValueError("merge needs at least one part corpus directory")
    arrays = [CorpusArrays(p) for p in parts]
    first = arrays[0].manifest
    for a in arrays[1:]:
        m = a.manifest
        if (m.channels, m.image_size) != (first.channels, first.image_size):
            raise ValueError(
                f"cannot merge {a.root} ({m.channels} ch, {m.image_size} px) with {arrays[0].root} "
                f"({first.channels} ch, {first.image_size} px): build all parts with the same --channels/--size"
            )
    shard_size = shard_size or first.build.get("shard_size", 2048)
    near_threshold = (
        first.build.get("near_threshold", dedupe.DEFAULT_NEAR_THRESHOLD) if near_threshold is None else near_threshold
    )
    confirm_threshold = first.build.get("confirm_threshold", dedupe.DEFAULT_CONFIRM_THRESHOLD)
    out = Path(out_dir)
    work = out / _BUILD_DIR
    work.mkdir(parents=True, exist_ok=True)
    params = BuildParams(
        channels=first.channels,
        image_size=first.image_size,
        resize_mode=first.build.get("resize_mode", "pad"),
        near_threshold=near_threshold,
        seed=first.build.get("seed", 0),
        shard_size=shard_size,
        num_parts=1,
        part=0,
        gray_tolerance=first.build.get("gray_tolerance", GRAY_TOLERANCE),
        sources=[{"merged_parts": [str(Path(p).resolve()) for p in parts]}],
        exclude=first.build.get("exclude", []),
        confirm_threshold=confirm_threshold,
    )
    _check_params(work, params)
    for tmp in out.glob("shard-?????.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)

    builder = TableBuilder()
    for a in arrays:
        for recs, ph in _part_batches(a):
            builder.add(recs, ph)
    table = builder.build()
    # every record carries the split its part gave it, so decide() keeps the parts' splits
    decision = decide(table, near_threshold=near_threshold, confirm_threshold=confirm_threshold, seed=0)

    writer = _ShardWriter(
        out, shard_size, first.channels, first.image_size, set(complete_shards(out)), progress, int(decision.keep.sum())
    )
    stats = _Stats()
    in_conflict = {i for c in decision.stats.get("label_conflicts", []) for i in c["members"]}
    names: dict[int, str] = {}
    i = 0
    for a in arrays:
        for s in range(len(a.manifest.shards)):
            images = a._images(s)
            for j, r in enumerate(a.records(s)):
                if i in in_conflict:
                    names[i] = _image_name(r)
                if decision.keep[i]:
                    rec = _final_record(r, table, decision, i)
                    stats.kept(rec)
                    writer.add(np.array(images[j]), _meta_of(table, decision, i), rec)
                else:
                    stats.dropped_by_source[r["source"]][decision.reason[i]] += 1
                i += 1
    writer.flush()
    merged = stats.to_dict() | {k: v for k, v in decision.stats.items() if k != "label_conflicts"}
    merged["parts"] = [
        {"dir": str(a.root), "images": len(a), "skipped": a.manifest.stats.get("skipped", {})} for a in arrays
    ]
    merged["skipped"] = dict(sum((Counter(a.manifest.stats.get("skipped", {})) for a in arrays), Counter()))
    merged["label_conflicts"] = _describe_conflicts(decision.stats.get("label_conflicts", []), names.__getitem__)
    merged["label_conflicts"] += [c for a in arrays for c in a.manifest.stats.get("label_conflicts", [])]
    merged["exclusion"] = _merge_exclusion([a.manifest.stats.get("exclusion", {}) for a in arrays])
    sources: dict[str, dict[str, Any]] = {}
    for a in arrays:
        for s in a.manifest.sources:
            sources.setdefault(s["name"], s)
    manifest = CorpusManifest(
        version=FORMAT_VERSION,
        channels=first.channels,
        image_size=first.image_size,
        shards=writer.shards,
        sources=[sources[n] for n in table.source_names if n in sources],
        label_names=table.label_names,
        build=dict(first.build)
        | {"merged_from": [str(a.root) for a in arrays], "shard_size": shard_size, "num_parts": 1, "part": 0},
        stats=merged,
    )
    _finish(out, manifest, work, keep_work_files=False)
    return manifest


def _merge_exclusion(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum the parts' exclusion counts (every part hashed the same targets)."""
    targets: dict[str, Counter[str]] = defaultdict(Counter)
    for ex in parts:
        for name, per_source in ex.get("targets", {}).items():
            targets[name].update(per_source)
    first = parts[0] if parts else {}
    return {
        "targets": {k: dict(v) for k, v in targets.items()},
        "target_images": first.get("target_images", {}),
        "target_skipped": first.get("target_skipped", {}),
        "target_duplicates": first.get("target_duplicates", {}),
    }


def _part_batches(a: CorpusArrays) -> Iterator[tuple[list[dict[str, Any]], np.ndarray]]:
    """A part's records per shard, with the split the part assigned as the given split."""
    offset = 0
    for s, info in enumerate(a.manifest.shards):
        recs = a.records(s)
        yield recs, a.phash[offset : offset + info.count]
        offset += info.count
