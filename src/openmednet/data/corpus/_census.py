"""The channel census: which corpus channels a build uses, judged on a decoded sample of the plan.

Per source it counts the plan items, the items in a test split, and the gray/colour family of
``CHANNEL_SAMPLE`` evenly spaced items (the first image of each). That resolves
``channels="auto"``, refuses explicit channels that would skip most images, and warns about
sources of the other family or holding a test split. The sample is decoded like the sources
themselves (``_pool.run_isolated``): with several workers a hostile file crashes a worker, not the
build, and is left out of the sample. The result is stored in ``.build/census.json`` so that a
resumed build reuses it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from openmednet.data.corpus._checks import warn
from openmednet.data.corpus._plan import item_from_json, source_roots
from openmednet.data.corpus._pool import run_isolated
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
    workers: int = 1,
) -> int:
    """Resolve (``"auto"``) or check the channels once per build, from a census of the plan stored
    in ``.build/census.json``; a resumed build reuses it (same sample, same answer, no decoding).

    A refused first attempt removes its ``.build`` (parameters and plan only), so the command can
    be re-run at once with other channels.
    """
    path = work / "census.json"
    if path.is_file():
        return int(json.loads(path.read_text())["channels"])
    census = take_census(plan_path, sources, gray_tolerance, workers)
    try:
        channels = resolve_channels(requested, census)
    except ValueError:
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
        raise
    _warn_test_splits(census)
    atomic_write_text(path, json.dumps({"channels": channels, "sources": census}, indent=1))
    return channels


def take_census(
    plan_path: Path, specs: Sequence[SourceSpec], gray_tolerance: int, workers: int = 1
) -> dict[str, dict[str, int]]:
    """Per source: plan items, items in a test split, and gray/colour counts of an evenly spaced
    sample of ``CHANNEL_SAMPLE`` items (first image of each; unreadable ones left out). A source's
    ``channels`` hint stands for its sample without decoding; the rest is decoded by ``workers``
    processes (1 = this process)."""
    by_name = {s.name: s for s in specs}
    counts = {n: {"items": 0, "test": 0, "gray": 0, "colour": 0} for n in by_name}
    for d in _plan_lines(plan_path):
        if d["source"] in counts:
            counts[d["source"]]["items"] += 1
            counts[d["source"]]["test"] += normalise_split(d["split"]) == "test"

    def count(name: str, grays: list[bool | None]) -> None:
        for gray in grays:
            if gray is not None:
                counts[name]["gray" if gray else "colour"] += 1

    to_decode = []
    for name, items in _sample(plan_path, {n: c["items"] for n, c in counts.items()}).items():
        hint = by_name[name].channels
        if hint is not None:  # the source's hint wins: nothing to decode
            count(name, [hint == 1] * len(items))
        elif items:
            to_decode.append((name, items))
    reader_options, roots = source_roots(specs)
    run_isolated(
        iter(to_decode), sample_is_gray, (reader_options, roots, gray_tolerance), workers, count, _join_sample
    )
    return counts


def _plan_lines(plan_path: Path) -> Iterator[dict[str, Any]]:
    with open(plan_path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _sample(plan_path: Path, items: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Per source, ``CHANNEL_SAMPLE`` of its ``items[source]`` plan items, evenly spaced in plan order."""
    picks = {n: {k * c // min(c, CHANNEL_SAMPLE) for k in range(min(c, CHANNEL_SAMPLE))} for n, c in items.items()}
    sample: dict[str, list[dict[str, Any]]] = {n: [] for n in items}
    seen = dict.fromkeys(items, 0)
    for d in _plan_lines(plan_path):
        name = d["source"]
        if name in items:
            if seen[name] in picks[name]:
                sample[name].append(d)
            seen[name] += 1
    return sample


def sample_is_gray(
    items: list[dict[str, Any]],
    reader_options: dict[str, dict[str, Any]],
    roots: dict[str, str | None],
    gray_tolerance: int,
) -> list[bool | None]:
    """Whether each item's first image is gray; ``None`` if it is unreadable (worker side)."""
    return [_first_is_gray(d, reader_options, roots, gray_tolerance) for d in items]


def _first_is_gray(
    d: dict[str, Any], reader_options: dict[str, dict[str, Any]], roots: dict[str, str | None], gray_tolerance: int
) -> bool | None:
    item = item_from_json(d, reader_options.get(d["source"], {}), roots.get(d["source"]))
    try:
        for arr, _ in read_item(item, on_skip=lambda s: None):
            return is_gray_content(arr, tol=gray_tolerance)
    except Exception:  # noqa: BLE001 - the decode stage reports this file; the sample only skips it
        return None
    return None


def _join_sample(items: list[dict[str, Any]], parts: list[list[bool | None] | None]) -> list[bool | None]:
    """``join`` of ``run_isolated``: an item that killed its process is left out like an unreadable one."""
    return [None if p is None else p[0] for p in parts]


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
