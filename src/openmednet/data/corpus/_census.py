"""The channel census: which corpus channels a build uses, judged on a decoded sample of the plan.

Per source it counts the plan items, the items in a test split, and the gray/colour family of
``CHANNEL_SAMPLE`` evenly spaced items (the first image of each). That resolves
``channels="auto"``, refuses explicit channels that would skip most images, and warns about
sources of the other family or holding a test split. The result is stored in
``.build/census.json`` so that a resumed build reuses it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from openmednet.data.corpus._checks import warn
from openmednet.data.corpus._plan import item_from_json
from openmednet.data.curation import normalise_split
from openmednet.data.images import is_gray_content
from openmednet.data.sources import SourceSpec, read_item
from openmednet.utils import atomic_write_text

#: Items per source decoded (evenly spaced in plan order) to choose or check the corpus channels.
CHANNEL_SAMPLE = 16


def plan_channels(
    work: Path,
    plan_path: Path,
    sources: Sequence[SourceSpec],
    requested: int | str,
    gray_tolerance: int,
    fresh: bool,
) -> int:
    """Resolve (``"auto"``) or check the channels once per build, from a census of the plan stored
    in ``.build/census.json``; a resumed build reuses it (same sample, same answer, no decoding).

    A refused first attempt removes its ``.build`` (parameters and plan only), so the command can
    be re-run at once with other channels.
    """
    path = work / "census.json"
    if path.is_file():
        return int(json.loads(path.read_text())["channels"])
    census = take_census(plan_path, sources, gray_tolerance)
    try:
        channels = resolve_channels(requested, census)
    except ValueError:
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
        raise
    _warn_test_splits(census)
    atomic_write_text(path, json.dumps({"channels": channels, "sources": census}, indent=1))
    return channels


def take_census(plan_path: Path, specs: Sequence[SourceSpec], gray_tolerance: int) -> dict[str, dict[str, int]]:
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
        for arr, _ in read_item(item_from_json(d, dict(spec.reader_options), root), on_skip=lambda s: None):
            return is_gray_content(arr, tol=gray_tolerance)
    except Exception:  # noqa: BLE001 - the decode stage reports this file; the sample only skips it
        return None
    return None


def resolve_channels(requested: int | str, census: dict[str, dict[str, int]]) -> int:
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
            warn(f"source '{name}' looks {other} ({c[other]} of {c['gray'] + c['colour']} sampled images): "
                 f"its {other} images are skipped as wrong_channels in this {channels}-channel corpus")
    return channels


def _warn_test_splits(census: dict[str, dict[str, int]]) -> None:
    for name, c in census.items():
        if c["test"]:
            warn(f"source '{name}' holds {c['test']:,} images in a test split: if it is an evaluation target, "
                 "pass it to --exclude instead of as a source")
