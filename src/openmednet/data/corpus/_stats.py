"""The statistics a build or merge stores in ``manifest.stats`` for the report, counted as it writes."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from openmednet.data.readers.base import printable_path

#: Bin edges (longest original side, pixels) of the size histogram per source.
_SIZE_BINS = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 1 << 30]


class Stats:
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
        """Count an image written to the corpus (its final record)."""
        self.per_source[rec["source"]] += 1
        self.per_modality[rec.get("modality") or "unknown"] += 1
        self.per_label[f"{rec['source']}/{rec['label']}" if rec.get("label") else f"{rec['source']}/(unlabelled)"] += 1
        self.per_split[rec["split"]] += 1
        side = max(rec["orig_shape"][:2])
        self.sizes[rec["source"]][int(np.searchsorted(_SIZE_BINS, side, side="right")) - 1] += 1

    def skip(self, rec: dict[str, Any]) -> None:
        """Count a skip record of the decode stage (``{"skip": reason, ...}``)."""
        self.skipped[rec["skip"]] += 1
        self.skipped_by_source[rec["source"]][rec["skip"]] += 1
        if len(self.skip_examples[rec["skip"]]) < 5:
            # printable: a skipped file's name may be the undecodable bytes that caused the skip
            self.skip_examples[rec["skip"]].append(f"{printable_path(rec['path'])}: {rec.get('message', '')}"[:300])

    def dropped(self, source: str, reason: str) -> None:
        """Count an image that the decisions dropped (duplicate, excluded target, leakage)."""
        self.dropped_by_source[source][reason] += 1

    def to_dict(self) -> dict[str, Any]:
        """The counts as plain JSON types."""
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


def image_name(r: dict[str, Any]) -> str:
    """An image as the report names it: ``source:path``, plus ``#frame`` after the first frame."""
    frame = r.get("frame")
    return f"{r['source']}:{r['path']}" + ("" if frame in (None, 0) else f"#{frame}")


def describe_conflicts(conflicts: list[dict[str, Any]], name: Callable[[int], str]) -> list[dict[str, Any]]:
    """Label conflicts for the report: ``{"labels": [...], "images": ["source:path", ...]}``."""
    return [{"labels": c["labels"], "images": [name(i) for i in c["members"]]} for c in conflicts]
