"""Stage 4, write: the one loop that streams decided images into shards, for builds and merges.

``write_images`` walks every image in the order of the decision table, writes the kept ones into
shards of ``shard_size`` (``openmednet.data.shards.write_shard``: a temporary directory, then a
rename), skips shards a previous run completed, and counts what the report shows. Its two
halves also run alone over the same walk (``_walk``): ``write_shards`` (the pixels) and
``count_images`` (the records only), so that a build with spare workers counts and draws the
report in another process while it writes. ``finish_corpus`` then writes the manifest (last: a
corpus is complete iff it has one), the report, and removes the work files.
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openmednet.data.corpus._plan import BUILD_DIR, ProgressFn
from openmednet.data.corpus._stats import Stats, describe_conflicts, image_name
from openmednet.data.curation import Decision, ImageTable, stable_u64
from openmednet.data.shards import SPLITS, CorpusManifest, ShardInfo, write_shard

if TYPE_CHECKING:
    from openmednet.data.report import Figures

logger = logging.getLogger(__name__)

ImageFn = Callable[[], np.ndarray]
"""Loads one ``(C, S, S)`` uint8 image; called only for images a shard still needs."""


def write_images(
    out: Path,
    rows: Iterable[tuple[dict[str, Any], ImageFn | None]],
    table: ImageTable,
    decision: Decision,
    *,
    channels: int,
    image_size: int,
    shard_size: int,
    done: set[int],
    progress: ProgressFn | None,
) -> tuple[dict[str, Any], list[ShardInfo]]:
    """Write the images ``decision`` keeps into the shards of ``out`` and count them for the
    report, in one pass over ``rows`` (``write_shards`` and ``count_images`` at once).

    Args:
        out: the corpus directory.
        rows: ``(record, load_image)`` for every image of ``table``, in its order; skip records of
            the decode stage (``{"skip": reason, ...}``, ``load_image`` ``None``) may come between
            them and are counted.
        table, decision: the image table and what ``openmednet.data.curation.decide`` made of it.
        channels, image_size: the corpus images' ``C`` and ``S``.
        shard_size: images per shard.
        done: indices of shards complete on disk (same content: same plan, same decisions).
        progress: optional ``progress("write", done, total)`` callback.

    Returns:
        The statistics (see ``count_images``) and the shard list.

    Raises:
        RuntimeError: a record that is not the table's image at its position (stale work files).
    """
    counter = _Counter(decision)
    writer = _ShardWriter(out, shard_size, channels, image_size, done, progress, int(decision.keep.sum()))
    _walk(out, rows, table, decision, counter, writer)
    return counter.result(), writer.shards


def write_shards(
    out: Path, rows: Iterable[tuple[dict[str, Any], ImageFn | None]], table: ImageTable, decision: Decision,
    *, channels: int, image_size: int, shard_size: int, done: set[int], progress: ProgressFn | None,
) -> list[ShardInfo]:
    """The shards of ``write_images`` without its counts, so the counting can run in another
    process meanwhile (arguments and errors as there)."""
    writer = _ShardWriter(out, shard_size, channels, image_size, done, progress, int(decision.keep.sum()))
    _walk(out, rows, table, decision, None, writer)
    return writer.shards


def count_images(
    out: Path, rows: Iterable[tuple[dict[str, Any], ImageFn | None]], table: ImageTable, decision: Decision
) -> dict[str, Any]:
    """The counts of ``write_images`` without writing: ``rows`` need only the records (their
    loaders are never called), so another process can count while the shards are written.

    Returns:
        ``Stats.to_dict()``, then the decision's counts, then ``label_conflicts`` with the images
        named.

    Raises:
        RuntimeError: a record that is not the table's image at its position (stale work files).
    """
    counter = _Counter(decision)
    _walk(out, rows, table, decision, counter, None)
    return counter.result()


def _walk(
    out: Path,
    rows: Iterable[tuple[dict[str, Any], ImageFn | None]],
    table: ImageTable,
    decision: Decision,
    counter: _Counter | None,
    writer: _ShardWriter | None,
) -> None:
    """The one loop over the decided images: each row, in table order, goes to the counter and
    to the writer (either may be ``None``), so that counting alone, writing alone and both at once
    see the same images in the same order."""
    i = 0
    for r, load_image in rows:
        if "skip" in r:
            if counter is not None:
                counter.stats.skip(r)
            continue
        if table.key[i] != stable_u64(f"{r['source']}/{r['path']}#{r.get('frame')}"):
            raise RuntimeError(
                f"image {i} ({image_name(r)}) does not match the decision table; delete {out / BUILD_DIR} and rebuild"
            )
        if decision.keep[i]:
            rec = _final_record(r, table, decision, i)
            if counter is not None:
                counter.stats.kept(rec)
            if writer is not None:
                writer.add(load_image, _meta_of(table, decision, i), rec)
        elif counter is not None:
            counter.stats.dropped(r["source"], decision.reason[i])
        if counter is not None and i in counter.in_conflict:
            counter.names[i] = image_name(r)
        i += 1
    if writer is not None:
        writer.flush()


class _Counter:
    """The report's counts of one walk: ``Stats``, and the names of the label-conflicting images."""

    def __init__(self, decision: Decision):
        self.decision = decision
        self.stats = Stats()
        self.in_conflict = {i for c in decision.stats.get("label_conflicts", []) for i in c["members"]}
        self.names: dict[int, str] = {}

    def result(self) -> dict[str, Any]:
        """``Stats.to_dict()``, then the decision's counts, then ``label_conflicts`` named."""
        conflicts = self.decision.stats.get("label_conflicts", [])
        out = self.stats.to_dict() | {k: v for k, v in self.decision.stats.items() if k != "label_conflicts"}
        out["label_conflicts"] = describe_conflicts(conflicts, self.names.__getitem__)
        return out


def finish_corpus(
    out: Path, manifest: CorpusManifest, work: Path, keep_work_files: bool, figures: Figures | None = None
) -> None:
    """Manifest last (a corpus is complete iff it has one), then the report (with ``figures``,
    its plots, when drawn already: ``openmednet.data.report.draw_figures``), then clean up."""
    from openmednet.data.report import write_report

    manifest.save(out)
    write_report(manifest, out, figures)
    if not keep_work_files:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("corpus %s: %d images in %d shards", out, manifest.num_images, len(manifest.shards))


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

    def add(self, load_image: ImageFn, meta: dict[str, Any], record: dict[str, Any]) -> None:
        index = len(self.shards)
        if index not in self.done:  # a complete shard's pixels are not needed again
            self.images.append(load_image())
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
