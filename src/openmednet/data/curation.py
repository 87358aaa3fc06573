"""Curation rules of a corpus: which images enter, with which split and label.

``build_corpus`` and ``merge_parts`` (``openmednet.data.corpus``) reduce every decoded image to a
row of an ``ImageTable`` (ids and hashes, about 100 bytes) and call ``decide``, which applies the
exclusion, exact-duplicate, label-conflict, split and leakage rules of docs/corpus.md on the table
alone (never on pixels), so the same rules serve a single build and a merge of parts.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openmednet.data import dedupe
from openmednet.data.shards import NO_SPLIT, UNLABELLED

#: Fractions of split-less units assigned to val and test (by a seeded hash of the unit).
VAL_FRACTION = 0.05
TEST_FRACTION = 0.05

_SPLIT_RANK = {"train": 0, "val": 1, "test": 2}


def normalise_split(split: str | None) -> str | None:
    """Map a source's split name to ``train``/``val``/``test`` (``None`` when unknown).

    Sources spell splits many ways (``TRAIN``, ``validation``, ``HAM10000_train``,
    ``ISIC2018_task3_test``); a substring rule covers them. ``test`` wins over ``train`` because
    names like ``trainval`` do not occur while ``..._test`` does.
    """
    if not split:
        return None
    s = split.lower()
    for key, name in (("test", "test"), ("val", "val"), ("train", "train")):
        if key in s:
            return name
    return None


def stable_u64(text: str) -> int:
    """A stable (process- and machine-independent) 64-bit hash of a string; never 0.

    Surrogate escapes (file names that are not UTF-8) hash as their original bytes instead of
    raising; valid text hashes exactly as before.
    """
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big") or 1


@dataclass
class ImageTable:
    """Compact per-image facts the decisions need (about 60 bytes per image).

    Attributes:
        source: ``(N,)`` int16 index into ``source_names``.
        split: ``(N,)`` int8 index into ``SPLITS`` as given by the source, -1 = none.
        label: ``(N,)`` int32 index into ``label_names``, -1 = unlabelled.
        group: ``(N,)`` uint64 stable hash of ``(source, group id)``, 0 = none.
        key: ``(N,)`` uint64 stable hash of ``(source, path, frame)`` (split assignment unit).
        phash, sha1, sha1_file: ``(N,)`` uint64 hashes (SHA-1s as 64-bit prefixes).
        phash256: ``(N, 4)`` uint64 fine perceptual hashes (confirm near candidates).
    """

    source_names: list[str]
    label_names: list[str]
    source: np.ndarray
    split: np.ndarray
    label: np.ndarray
    group: np.ndarray
    key: np.ndarray
    phash: np.ndarray
    sha1: np.ndarray
    sha1_file: np.ndarray
    phash256: np.ndarray

    def __len__(self) -> int:
        return len(self.source)


class TableBuilder:
    """Accumulates ``ImageTable`` columns from image records without keeping the records."""

    def __init__(self, source_names: Sequence[str] = (), label_names: Sequence[str] = ()):
        self.source_names = list(source_names)
        self.label_names = list(label_names)
        self._sources = {n: i for i, n in enumerate(self.source_names)}
        self._labels = {n: i for i, n in enumerate(self.label_names)}
        self.cols: dict[str, list[np.ndarray]] = defaultdict(list)

    def _index(self, table: dict[str, int], names: list[str], name: str) -> int:
        if name not in table:
            table[name] = len(names)
            names.append(name)
        return table[name]

    def add(self, records: list[dict[str, Any]], phash: np.ndarray) -> None:
        """Add image records (skip records excluded) with their ``(n,)`` phashes."""
        rows = [
            (
                self._index(self._sources, self.source_names, r["source"]),
                _SPLIT_RANK.get(normalise_split(r.get("split")) or "", NO_SPLIT),
                self._index(self._labels, self.label_names, f"{r['source']}/{r['label']}")
                if r.get("label")
                else UNLABELLED,
                stable_u64(f"{r['source']}/{r['group']}") if r.get("group") else 0,
                stable_u64(f"{r['source']}/{r['path']}#{r.get('frame')}"),
                dedupe.hex_to_u64(r["sha1"]),
                dedupe.hex_to_u64(r["sha1_file"]),
            )
            for r in records
        ]
        arr = np.array(rows, dtype=object).reshape(-1, 7)
        for j, (name, dtype) in enumerate(
            [
                ("source", np.int16),
                ("split", np.int8),
                ("label", np.int32),
                ("group", np.uint64),
                ("key", np.uint64),
                ("sha1", np.uint64),
                ("sha1_file", np.uint64),
            ]
        ):
            self.cols[name].append(arr[:, j].astype(dtype))
        self.cols["phash"].append(np.asarray(phash, np.uint64))
        fine = [[int(r["phash256"][k : k + 16], 16) for k in range(0, 64, 16)] for r in records]
        self.cols["phash256"].append(np.array(fine, dtype=np.uint64).reshape(-1, 4))

    def build(self) -> ImageTable:
        """The table of everything added so far (columns concatenated)."""
        dtypes = {
            "source": np.int16,
            "split": np.int8,
            "label": np.int32,
            "group": np.uint64,
            "key": np.uint64,
            "phash": np.uint64,
            "sha1": np.uint64,
            "sha1_file": np.uint64,
        }
        cols = {k: (np.concatenate(self.cols[k]) if self.cols[k] else np.zeros(0, t)) for k, t in dtypes.items()}
        cols["phash256"] = (
            np.concatenate(self.cols["phash256"]) if self.cols["phash256"] else np.zeros((0, 4), np.uint64)
        )
        return ImageTable(self.source_names, self.label_names, **cols)


@dataclass
class Decision:
    """What happens to each image of an ``ImageTable``.

    Attributes:
        keep: ``(N,)`` bool.
        reason: ``(N,)`` drop reason per image (``""`` when kept): ``excluded_target``,
            ``duplicate_exact``, ``near_duplicate_cross_split``.
        split: ``(N,)`` int8 final corpus split (index into ``SPLITS``).
        label: ``(N,)`` int32 final label (-1 for a kept copy whose copies disagree).
        label_conflict: ``(N,)`` bool, kept images whose exact copies carry other labels.
        stats: duplicate and leakage counts for the report.
    """

    keep: np.ndarray
    reason: np.ndarray
    split: np.ndarray
    label: np.ndarray
    label_conflict: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def _exact_pairs(t: ImageTable) -> np.ndarray:
    return np.concatenate([dedupe.equal_pairs(t.sha1), dedupe.equal_pairs(t.sha1_file)])


def _cluster_summary(t: ImageTable, comp: np.ndarray, split: np.ndarray) -> dict[str, Any]:
    """Count clusters (components of size >= 2) within one source, across sources, across splits."""
    n = len(comp)
    sizes = np.bincount(comp, minlength=n)
    members = np.flatnonzero(sizes[comp] >= 2)
    if len(members) == 0:
        return {
            "clusters": 0,
            "images": 0,
            "within_source": 0,
            "across_sources": 0,
            "across_splits": 0,
            "source_pairs": {},
        }
    c = comp[members]
    order = np.argsort(c, kind="stable")
    c, members = c[order], members[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    groups = np.split(members, starts[1:])
    within = across_src = across_split = 0
    pairs: Counter[str] = Counter()
    for g in groups:
        srcs = sorted(set(t.source[g].tolist()))
        if len(srcs) == 1:
            within += 1
        else:
            across_src += 1
            for a in range(len(srcs)):
                for b in range(a + 1, len(srcs)):
                    pairs[f"{t.source_names[srcs[a]]} / {t.source_names[srcs[b]]}"] += 1
        sp = set(split[g].tolist()) - {NO_SPLIT}
        across_split += len(sp) > 1
    return {
        "clusters": len(groups),
        "images": len(members),
        "within_source": within,
        "across_sources": across_src,
        "across_splits": int(across_split),
        "source_pairs": dict(pairs.most_common()),
    }


def _label_conflicts(t: ImageTable, comp: np.ndarray) -> list[list[int]]:
    """Exact-duplicate clusters whose copies in one source carry different labels (member lists)."""
    sizes = np.bincount(comp, minlength=len(comp))
    labelled = np.flatnonzero((t.label >= 0) & (sizes[comp] > 1))
    seen: dict[tuple[int, int], set[int]] = defaultdict(set)
    members: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in labelled:
        k = (int(comp[i]), int(t.source[i]))
        seen[k].add(int(t.label[i]))
        members[k].append(int(i))
    return [members[k] for k, labels in seen.items() if len(labels) > 1]


def _assign_splits(t: ImageTable, alive: np.ndarray, near: np.ndarray, seed: int) -> np.ndarray:
    """Final split per image: the source's split where given, else one per connected unit.

    A unit is a connected component of "same group" and near-duplicate links, so a patient and
    the near copies of an image land in one split. A unit holding an image with a given split
    follows it (the lowest rank: train before val before test); other units get val/test with
    probability ``VAL_FRACTION``/``TEST_FRACTION`` from a seeded hash of their smallest key, so
    the assignment does not depend on item order, worker count or part.
    """
    n = len(t)
    links = [near, dedupe.equal_pairs(np.where(alive, t.group, 0))]
    comp = dedupe.components(n, np.concatenate(links))
    big = np.iinfo(np.int8).max
    rank = np.where((t.split >= 0) & alive, t.split, big).astype(np.int16)
    unit_rank = np.full(n, big, np.int16)
    np.minimum.at(unit_rank, comp, rank)
    unit_key = np.full(n, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(unit_key, comp, np.where(alive, t.key, np.iinfo(np.uint64).max))
    u = np.array([stable_u64(f"{seed}:{k}") for k in unit_key[comp]], dtype=np.float64) / 2.0**64 if n else np.zeros(0)
    drawn = np.where(u < TEST_FRACTION, 2, np.where(u < TEST_FRACTION + VAL_FRACTION, 1, 0))
    inherited = np.where(unit_rank[comp] < big, unit_rank[comp], drawn)
    return np.where(t.split >= 0, t.split, inherited).astype(np.int8)


def decide(
    table: ImageTable,
    *,
    near_threshold: int = dedupe.DEFAULT_NEAR_THRESHOLD,
    confirm_threshold: int = dedupe.DEFAULT_CONFIRM_THRESHOLD,
    seed: int = 0,
    excluded: np.ndarray | None = None,
) -> Decision:
    """Choose which images enter the corpus, their split and label.

    Rules (see docs/corpus.md):

    1. ``excluded`` images (matches of ``--exclude`` targets) are dropped first.
    2. Exact duplicates (equal pixel SHA-1 after normalisation, or equal file bytes): one copy
       is kept, preferring the source's train copy, then val, test, no split, then plan order.
       When the copies inside one source carry different labels, the kept copy becomes
       unlabelled and is flagged (``label_conflict``).
    3. Splits are assigned (``_assign_splits``).
    4. A near duplicate (64-bit phash within ``near_threshold`` bits, confirmed by the 256-bit
       phash within ``confirm_threshold`` bits) of a kept image in an earlier
       split (train < val < test) is dropped: evaluation images must have no near copy in
       training. Near copies inside one split are kept and only reported.

    Args:
        table: per-image hashes and ids.
        near_threshold: Hamming threshold in bits of the 64-bit phash (candidates).
        confirm_threshold: Hamming threshold in bits of the 256-bit phash (confirmation).
        seed: split assignment seed.
        excluded: ``(N,)`` bool, images matching an exclusion target.

    Returns:
        The ``Decision``.
    """
    n = len(table)
    reason = np.full(n, "", dtype=object)
    excluded = np.zeros(n, bool) if excluded is None else excluded
    reason[excluded] = "excluded_target"
    exact_comp = dedupe.components(n, _exact_pairs(table))
    near = dedupe.confirm_pairs(dedupe.near_pairs(table.phash, near_threshold), table.phash256, confirm_threshold)
    split = _assign_splits(table, ~excluded, near, seed)
    stats: dict[str, Any] = {"near_threshold": near_threshold, "confirm_threshold": confirm_threshold}
    stats["exact"] = _cluster_summary(table, exact_comp, table.split)
    near_comp = dedupe.components(n, near)
    stats["near"] = _cluster_summary(table, near_comp, table.split)

    # rule 2: one representative per exact cluster among the non-excluded images
    rank = np.where(split >= 0, split, 3).astype(np.int64)
    order = np.lexsort((np.arange(n), rank, excluded, exact_comp))
    # n == 0 (every item of a build or part skipped): nothing to decide, no crash
    first = np.r_[True, exact_comp[order][1:] != exact_comp[order][:-1]] if n else np.zeros(0, bool)
    rep = np.zeros(n, bool)
    rep[order[first]] = True
    dup = ~rep & ~excluded
    reason[dup] = "duplicate_exact"
    label = table.label.copy()
    conflict = np.zeros(n, bool)
    conflicts = _label_conflicts(table, exact_comp)
    for members in conflicts:
        kept = [i for i in members if rep[i]] or [int(np.flatnonzero(rep & (exact_comp == exact_comp[members[0]]))[0])]
        label[kept] = UNLABELLED
        conflict[kept] = True
    stats["label_conflicts"] = [
        {"labels": sorted({table.label_names[table.label[i]] for i in m}), "members": m} for m in conflicts
    ]

    # rule 4: evaluation-side near copies of kept images in an earlier split
    alive = rep & ~excluded
    a, b = near[:, 0], near[:, 1]
    live = alive[a] & alive[b] & (split[a] != split[b])
    later = np.where(split[a[live]] > split[b[live]], a[live], b[live])
    leak = np.zeros(n, bool)
    leak[later] = True
    reason[leak & alive] = "near_duplicate_cross_split"
    keep = alive & ~leak
    stats["dropped"] = dict(Counter(r for r in reason.tolist() if r))
    return Decision(keep, reason, split, label, conflict, stats)


# --- exclusion targets --------------------------------------------------------------------------


@dataclass
class TargetHashes:
    """Hashes of the images of ``--exclude`` targets: per image the target index and hashes."""

    names: list[str]
    target: np.ndarray  # (M,) int16
    phash: np.ndarray  # (M,) uint64
    sha1: np.ndarray  # (M,) uint64
    sha1_file: np.ndarray  # (M,) uint64
    phash256: np.ndarray  # (M, 4) uint64
    table: ImageTable | None = None  # the targets' own table (for their internal duplicates)
    skipped: dict[str, int] = field(default_factory=dict)
    image_names: list[str] = field(default_factory=list)  # "source:path[#frame]" per image


def match_targets(
    table: ImageTable,
    targets: TargetHashes,
    near_threshold: int = dedupe.DEFAULT_NEAR_THRESHOLD,
    confirm_threshold: int = dedupe.DEFAULT_CONFIRM_THRESHOLD,
) -> tuple[np.ndarray, dict[str, dict[str, int]], dict[str, int]]:
    """Corpus images equal to, or near copies of, a target image (same rule as ``decide``).

    Returns:
        ``(matched, counts, found)``: ``(N,)`` bool over the corpus images;
        ``{target: {corpus source: corpus images matched}}``; ``{target: target images with at
        least one copy in the corpus}``.
    """
    n = len(table)
    hit_image = np.full(n, -1, np.int64)  # index of the first matching target image
    target_hit = np.zeros(len(targets.target), bool)
    for col in ("sha1", "sha1_file"):
        ours, theirs = getattr(table, col), getattr(targets, col)
        pos: dict[int, list[int]] = defaultdict(list)
        for j, h in enumerate(theirs.tolist()):
            pos[h].append(j)
        for i, h in enumerate(ours.tolist()):
            if h in pos:
                target_hit[pos[h]] = True
                if hit_image[i] < 0:
                    hit_image[i] = pos[h][0]
    pairs = dedupe.near_pairs(table.phash, near_threshold, others=targets.phash)
    pairs = dedupe.confirm_pairs(pairs, table.phash256, confirm_threshold, fine_others=targets.phash256)
    target_hit[pairs[:, 1]] = True
    for i, j in pairs:
        if hit_image[i] < 0:
            hit_image[i] = j
    counts: dict[str, dict[str, int]] = {name: {} for name in targets.names}
    for i in np.flatnonzero(hit_image >= 0):
        per = counts[targets.names[targets.target[hit_image[i]]]]
        src = table.source_names[table.source[i]]
        per[src] = per.get(src, 0) + 1
    found = {name: int(target_hit[targets.target == t].sum()) for t, name in enumerate(targets.names)}
    return hit_image >= 0, counts, found
