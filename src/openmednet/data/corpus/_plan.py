"""Stage 1 of a build, the plan: the build parameters and every item of every source, in order.

The plan (``.build/plan.jsonl``, one JSON object per item, no pixels) fixes the item order of a
build; ``params.json`` holds the ``BuildParams`` a resumed build must repeat. Both are written
atomically. Decoding reads the plan back lazily in chunks of ``chunk_items`` items.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from openmednet.data import dedupe
from openmednet.data.shards import FORMAT_VERSION
from openmednet.data.sources import SourceItem, SourceSpec, iter_source
from openmednet.utils import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

#: Items per decode task: small enough to balance 2-64 workers and to lose little work on a kill.
CHUNK_ITEMS = 64
#: The work directory of an unfinished build, inside the corpus directory.
BUILD_DIR = ".build"

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called as stages advance (stage names: plan, targets, decode,
write)."""


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


def check_params(work: Path, params: BuildParams) -> None:
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


def spec_dict(spec: SourceSpec) -> dict[str, Any]:
    """The parts of a ``SourceSpec`` that determine a build (stored in ``params.json``)."""
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


def item_part(item: SourceItem, num_parts: int) -> int:
    """The part (of ``num_parts``) that builds ``item``: a hash of its group, else of its path, so
    a patient's images stay in one part."""
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


def item_from_json(d: dict[str, Any], reader_options: dict[str, Any], root: str | None = None) -> SourceItem:
    """A plan line back as a ``SourceItem``; ``root`` is the folder its file must resolve inside
    (``None``: anywhere)."""
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


def write_plan(path: Path, specs: Sequence[SourceSpec], num_parts: int, part: int, progress: ProgressFn | None) -> int:
    """Enumerate ``specs`` into a JSON-lines plan (atomically); returns the number of items."""
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        for spec in specs:
            for item in iter_source(spec):
                if num_parts > 1 and item_part(item, num_parts) != part:
                    continue
                f.write((json.dumps(_item_to_json(item)) + "\n").encode())
                count += 1
                if progress and count % 1000 == 0:
                    progress("plan", count, 0)

    atomic_write(path, write)
    return count


def plan_chunks(
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


def source_roots(specs: Sequence[SourceSpec]) -> tuple[dict[str, dict[str, Any]], dict[str, str | None]]:
    """Per source name: its reader options, and the folder its files must resolve inside
    (``None`` with ``allow_outside_root``); what a worker needs to read a plan item."""
    options = {s.name: dict(s.reader_options) for s in specs}
    roots = {s.name: None if s.allow_outside_root else str(s.root) for s in specs}
    return options, roots
