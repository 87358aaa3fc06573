"""Exclusion targets (``--exclude``): their sources, and their images hashed for ``match_targets``.

Target images are decoded like the sources' (same workers, no channel routing: every image is
converted to the corpus channels) into ``.build/targets/``; only their hashes are kept.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from openmednet.data.corpus._decode import DecodeOptions, load_chunk, run_chunks
from openmednet.data.corpus._plan import (
    CHUNK_ITEMS,
    ProgressFn,
    plan_chunks,
    write_plan,
)
from openmednet.data.corpus._stats import image_name
from openmednet.data.curation import TableBuilder, TargetHashes
from openmednet.data.sources import SourceSpec


def target_spec(path: str | Path) -> SourceSpec:
    """A ``SourceSpec`` for an ``--exclude`` argument: a source folder (any layout ``auto``
    detects, e.g. with ``labels.csv``), or a MedMNIST ``.npz``; named after the folder/file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"exclusion target not found: {p} (expected a source folder or a .npz file)")
    name = p.stem if p.is_file() else p.name
    return SourceSpec(name=name, root=p)


def hash_targets(
    specs: Sequence[SourceSpec], work: Path, opts: DecodeOptions, workers: int, progress: ProgressFn | None
) -> TargetHashes:
    """Decode and hash every image of the targets ``specs`` (resumable, under ``work/targets``)."""
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
            write_plan(plan, [spec], 1, 0, None)
        p, b = plan_chunks(plan, tdir, f"t{ti:03d}-chunk", CHUNK_ITEMS)
        paths += p
        batches.append(b)
    hints = {s.name: None for s in specs}
    run_chunks(paths, itertools.chain(*batches), specs, hints, opts, workers, "targets", progress)
    builder = TableBuilder()
    image_names: list[str] = []
    target_idx: list[np.ndarray] = []
    skipped: Counter[str] = Counter()
    for path in paths:
        ch = load_chunk(path, with_images=False)
        recs = [r for r in ch["records"] if "skip" not in r]
        skipped.update(f"{r['source']}: {r['skip']}" for r in ch["records"] if "skip" in r)
        builder.add(recs, ch["phash"])
        image_names += [image_name(r) for r in recs]
        target_idx.append(np.array([names.index(r["source"]) for r in recs], np.int16))
    table = builder.build()
    tgt = np.concatenate(target_idx) if target_idx else np.zeros(0, np.int16)
    return TargetHashes(
        names, tgt, table.phash, table.sha1, table.sha1_file, table.phash256, table, dict(skipped), image_names
    )
