"""``merge_parts``: join part corpora (``--num-parts``/``--part``) into one, de-duplicated across parts."""

from __future__ import annotations

import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from openmednet.data import dedupe
from openmednet.data.corpus._decode import GRAY_TOLERANCE
from openmednet.data.corpus._plan import (
    BUILD_DIR,
    BuildParams,
    ProgressFn,
    check_params,
)
from openmednet.data.corpus._write import ImageFn, finish_corpus, write_images
from openmednet.data.curation import TableBuilder, decide
from openmednet.data.shards import (
    FORMAT_VERSION,
    CorpusArrays,
    CorpusManifest,
    complete_shards,
)


def _check_distinct(arrays: Sequence[CorpusArrays]) -> None:
    """Refuse a part given twice (the same folder, or a copy: the same part of the same split
    build), which the merge would otherwise reduce to one copy as exact duplicates, silently."""
    seen: dict[object, Path] = {}
    for a in arrays:
        build = a.manifest.build
        keys = [Path(a.root).resolve()]
        if build.get("num_parts", 1) > 1:  # whole corpora may legitimately share part 0 of 1
            keys.append((build["num_parts"], build.get("part"), build.get("seed"), repr(a.manifest.sources)))
        for key in keys:
            if key in seen:
                what = ("is given twice" if isinstance(key, Path)
                        else f"holds part {build.get('part')} of {build['num_parts']} of the build {seen[key]} holds")
                raise ValueError(f"{a.root} {what}: give each part once (corpus merge P0 P1 ... with the parts of one build)")
            seen[key] = Path(a.root)


def _check_complete(arrays: Sequence[CorpusArrays]) -> None:
    """Refuse parts of a split build (``--num-parts K``) without all K of them: the merge made a
    corpus of some parts, said nothing, and looked finished. Each part's manifest names its build."""
    builds: dict[tuple, set[int]] = {}
    for a in arrays:
        build = a.manifest.build
        if build.get("num_parts", 1) > 1:
            key = (build["num_parts"], build.get("seed"), repr(a.manifest.sources))
            builds.setdefault(key, set()).add(int(build.get("part", 0)))
    for (num_parts, _, _), given in builds.items():
        missing = sorted(set(range(num_parts)) - given)
        if missing:
            raise ValueError(f"parts {missing} of {num_parts} of a split build are missing (given: {sorted(given)}): "
                             f"merge all {num_parts} parts (corpus build ... --num-parts {num_parts} --part K)")


def _check_out(out: Path, arrays: Sequence[CorpusArrays]) -> None:
    """Refuse an ``--out`` that is (or lies inside, or holds) one of the parts, or that holds a
    finished corpus of its own: the merge wrote its manifest over it and reused its shards as
    "already written", leaving a corpus whose manifest and shards disagree."""
    target = out.resolve()
    for a in arrays:
        root = Path(a.root).resolve()
        if target == root or root in target.parents or target in root.parents:
            raise ValueError(f"--out {out} overlaps the part {a.root}: merge into a new folder")
    if (out / "manifest.json").is_file() and not (out / BUILD_DIR / "params.json").is_file():
        raise ValueError(f"{out} already holds a finished corpus; choose a new --out or delete it")


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
        ValueError: parts with different channels, image size or format version, none given, a
            part given twice (the same folder, or a copy of one), parts of a split build missing,
            or an ``out_dir`` that overlaps a part or holds a finished corpus.
    """
    if not parts:
        raise ValueError("merge needs at least one part corpus directory")
    arrays = [CorpusArrays(p) for p in parts]
    _check_distinct(arrays)
    _check_complete(arrays)
    _check_out(Path(out_dir), arrays)
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
    work = out / BUILD_DIR
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
    check_params(work, params)
    for tmp in out.glob("shard-?????.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)

    builder = TableBuilder()
    for a in arrays:
        for recs, ph in _part_batches(a):
            builder.add(recs, ph)
    table = builder.build()
    # every record carries the split its part gave it, so decide() keeps the parts' splits
    decision = decide(table, near_threshold=near_threshold, confirm_threshold=confirm_threshold, seed=0)

    stats, shards = write_images(
        out, _part_rows(arrays), table, decision, channels=first.channels, image_size=first.image_size,
        shard_size=shard_size, done=set(complete_shards(out)), progress=progress,
    )  # fmt: skip
    conflicts = stats.pop("label_conflicts") + [c for a in arrays for c in a.manifest.stats.get("label_conflicts", [])]
    merged = stats | {
        "parts": [
            {"dir": str(a.root), "images": len(a), "skipped": a.manifest.stats.get("skipped", {})} for a in arrays
        ],
        "skipped": dict(sum((Counter(a.manifest.stats.get("skipped", {})) for a in arrays), Counter())),
        "label_conflicts": conflicts,
        "exclusion": _merge_exclusion([a.manifest.stats.get("exclusion", {}) for a in arrays]),
    }
    sources: dict[str, dict[str, Any]] = {}
    for a in arrays:
        for s in a.manifest.sources:
            sources.setdefault(s["name"], s)
    manifest = CorpusManifest(
        version=FORMAT_VERSION,
        channels=first.channels,
        image_size=first.image_size,
        shards=shards,
        sources=[sources[n] for n in table.source_names if n in sources],
        label_names=table.label_names,
        build=dict(first.build)
        | {"merged_from": [str(a.root) for a in arrays], "shard_size": shard_size, "num_parts": 1, "part": 0},
        stats=merged,
    )
    finish_corpus(out, manifest, work, keep_work_files=False)
    return manifest


def _part_rows(arrays: Sequence[CorpusArrays]) -> Iterator[tuple[dict[str, Any], ImageFn]]:
    """Every image of the parts in order: its record and a loader of its pixels (read only if kept)."""
    for a in arrays:
        for index, r in enumerate(a.iter_records()):
            yield r, partial(a.image, index)


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
