"""``build_corpus``: the stages of a build in order (plan, census, decode, decide, write).

This module only composes the stages of the sibling modules and resumes an interrupted build;
the overview is in the package docstring (``openmednet.data.corpus``).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from openmednet.data import dedupe
from openmednet.data.corpus._census import plan_channels
from openmednet.data.corpus._checks import (
    check_build_args,
    check_out_dir,
    check_sources,
)
from openmednet.data.corpus._decode import (
    GRAY_TOLERANCE,
    DecodeOptions,
    load_chunk,
    run_chunks,
)
from openmednet.data.corpus._plan import (
    BUILD_DIR,
    CHUNK_ITEMS,
    BuildParams,
    ProgressFn,
    check_params,
    plan_chunks,
    spec_dict,
    write_plan,
)
from openmednet.data.corpus._pool import worker_pool
from openmednet.data.corpus._stats import describe_conflicts
from openmednet.data.corpus._targets import hash_targets
from openmednet.data.corpus._write import (
    ImageFn,
    count_images,
    finish_corpus,
    write_images,
    write_shards,
)
from openmednet.data.curation import (
    Decision,
    ImageTable,
    TableBuilder,
    decide,
    match_targets,
)
from openmednet.data.report import Figures, draw_figures
from openmednet.data.shards import (
    FORMAT_VERSION,
    CorpusManifest,
    ShardInfo,
    complete_shards,
)
from openmednet.data.sources import SourceSpec
from openmednet.utils import atomic_write_text

logger = logging.getLogger(__name__)


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
        workers: decoding processes (1 = in this process), for the channel sample, the sources
            and the targets.
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
        ValueError: bad arguments, a source that is an exclusion target, ``out_dir`` inside a
            source folder, explicit channels that would skip most images, or an unfinished build
            in ``out_dir`` with other parameters.
        FileNotFoundError: a source or target root does not exist.
    """
    check_build_args(channels, image_size, resize_mode, shard_size, chunk_items, num_parts, part, sources)
    check_sources(sources, exclude)
    out = Path(out_dir)
    check_out_dir(out, sources)
    work = out / BUILD_DIR
    fresh = not (work / "params.json").is_file()
    work.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").is_file() and fresh:
        raise ValueError(f"{out} already holds a finished corpus; choose a new --out or delete it")
    params = BuildParams(
        channels, image_size, resize_mode, near_threshold, seed, shard_size, num_parts, part, gray_tolerance,
        [spec_dict(s) for s in sources], [spec_dict(s) for s in exclude], confirm_threshold, chunk_items,
    )  # fmt: skip
    check_params(work, params)
    for tmp in out.glob("shard-?????.tmp"):  # half-written shards of a killed run
        shutil.rmtree(tmp, ignore_errors=True)

    # 1. plan, and the channels from a census of it
    plan_path = work / "plan.jsonl"
    if not plan_path.is_file():
        write_plan(plan_path, sources, num_parts, part, progress)
    requested = channels
    channels = plan_channels(work, plan_path, sources, requested, gray_tolerance, fresh, workers)
    # 2. decode the targets and the sources into chunks
    targets = hash_targets(
        exclude, work, DecodeOptions(None, channels, image_size, resize_mode, gray_tolerance), workers, progress
    )
    chunk_dir = work / "chunks"
    chunk_dir.mkdir(exist_ok=True)
    chunk_paths, batches = plan_chunks(plan_path, chunk_dir, "chunk", chunk_items)
    opts = DecodeOptions(channels, channels, image_size, resize_mode, gray_tolerance)
    run_chunks(chunk_paths, batches, sources, {s.name: s.channels for s in sources}, opts, workers, "decode", progress)

    # 3. decide from the hash table
    builder = TableBuilder(source_names=[s.name for s in sources])
    for path in chunk_paths:
        ch = load_chunk(path, with_images=False)
        builder.add([r for r in ch["records"] if "skip" not in r], ch["phash"])
    table = builder.build()
    _check_decoded(table, num_parts)
    matched, exclusion_counts, targets_found = match_targets(table, targets, near_threshold, confirm_threshold)
    decision = decide(
        table, near_threshold=near_threshold, confirm_threshold=confirm_threshold, seed=seed, excluded=matched
    )

    # 4. write the shards (and count and draw the report meanwhile), then the manifest and report
    stats, shards, figures = _write_and_draw(
        out, chunk_paths, table, decision, workers, channels=channels, image_size=image_size,
        shard_size=shard_size, done=_reusable_shards(out, decision), progress=progress,
    )  # fmt: skip
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
            "label_conflicts": describe_conflicts(tdec.stats["label_conflicts"], targets.image_names.__getitem__),
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
    finish_corpus(out, manifest, work, keep_work_files, figures)
    return manifest


def _check_decoded(table: ImageTable, num_parts: int) -> None:
    """Refuse a corpus without an image, and name each source that gave none.

    A source of unreadable files vanished from the build's table without a word, and a corpus of
    none was written and failed only in pre-training. A part of a split build may hold none of a
    small source's images, so there it is a warning.

    Raises:
        ValueError: no image at all (a whole build).
    """
    names = list(table.source_names)
    empty = [n for i, n in enumerate(names) if not np.any(table.source == i)]
    where = " in this part" if num_parts > 1 else ""
    if len(table) == 0 and num_parts == 1:
        raise ValueError(f"no image of the sources {names} could be decoded: check their paths and formats "
                         f"(openmednet corpus build --help lists what is read)")
    if empty:
        warnings.warn(f"sources {empty} gave no decodable image{where}: check their paths and formats", stacklevel=3)


def _write_and_draw(
    out: Path, chunk_paths: list[Path], table: ImageTable, decision: Decision, workers: int, **write: Any
) -> tuple[dict[str, Any], list[ShardInfo], Figures | None]:
    """Write the shards and count the report's statistics; with spare workers, draw its plots too.

    The stage is serial, and it grows with the corpus (the shards, the counts) or is a fixed
    second of matplotlib (the plots): it is what kept 2 workers under 1.7x one (issue 15). With
    one worker, ``write_images`` writes and counts in one pass here and ``finish_corpus`` draws
    later. With more, the decode pool is gone by now, so one process counts and draws
    (``_count_and_draw``, from the chunks' records alone) while this one writes the shards. The
    corpus is the same either way: one walk (``_walk``) counts in both cases, and the same code
    draws the same statistics. The drawing process writes nothing (a killed build leaves what it
    always left) and dies with the build (``worker_pool``).

    Returns:
        The statistics, the shards, and the drawn plots (``None``: not drawn yet).
    """
    if workers <= 1:
        stats, shards = write_images(out, _chunk_rows(chunk_paths), table, decision, **write)
        return stats, shards, None
    with worker_pool(1) as pool:
        counted = pool.submit(_count_and_draw, out, chunk_paths, table, decision)
        shards = write_shards(out, _chunk_rows(chunk_paths), table, decision, **write)
        stats, figures = counted.result()
    return stats, shards, figures


def _count_and_draw(
    out: Path, chunk_paths: list[Path], table: ImageTable, decision: Decision
) -> tuple[dict[str, Any], Figures]:
    """The report's statistics (``count_images`` over the chunks' records) and its plots."""
    stats = count_images(out, _chunk_rows(chunk_paths, with_images=False), table, decision)
    return stats, draw_figures(stats)


def _chunk_rows(chunk_paths: list[Path], with_images: bool = True) -> Iterator[tuple[dict[str, Any], ImageFn | None]]:
    """Every record of the stored chunks in plan order, with its image (``None`` for a skip, and
    for every record without ``with_images``)."""
    for path in chunk_paths:
        ch = load_chunk(path, with_images)
        if not with_images:
            yield from ((r, None) for r in ch["records"])
            continue
        j = 0
        for r in ch["records"]:
            if "skip" in r:
                yield r, None
                continue
            yield r, partial(ch["images"].__getitem__, j)
            j += 1


def _reusable_shards(out: Path, decision: Decision) -> set[int]:
    """Shards complete on disk that a resumed build can keep: only if they were written from the
    same decisions (a fingerprint of them is stored next to the work files)."""
    fingerprint = hashlib.sha1(
        np.flatnonzero(decision.keep).tobytes() + decision.split.tobytes() + decision.label.tobytes()
    ).hexdigest()
    fp_path = out / BUILD_DIR / "decision.sha1"
    done = set(complete_shards(out))
    if done and (not fp_path.is_file() or fp_path.read_text() != fingerprint):
        logger.warning("complete shards in %s come from other decisions; rewriting them", out)
        done = set()
    atomic_write_text(fp_path, fingerprint)
    return done


def _source_entry(spec: SourceSpec) -> dict[str, Any]:
    d = spec_dict(spec)
    return {
        "name": d["name"],
        "modality": d["modality"],
        "license": d["license"],
        "root": d["root"],
        "format": d["format"],
    }
