"""Checks of a build's arguments and sources, before anything is written; ``CorpusWarning``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from openmednet.data.sources import SourceSpec


class CorpusWarning(UserWarning):
    """A build that runs but is probably not what was meant (a target next to the sources, a
    source holding a test split, a source of the other channel family)."""


def warn(message: str) -> None:
    """Issue a ``CorpusWarning`` attributed to the caller of the function that calls this."""
    warnings.warn(message, CorpusWarning, stacklevel=3)


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
                warn(f"source '{s.name}' ({s.root}) contains the exclusion target '{t.name}': its copies are "
                     "excluded by hash, but point the source at its own files")
            elif src.parent == tgt.parent:
                warn(f"source '{s.name}' ({s.root}) sits next to the exclusion target '{t.name}' in {src.parent}: "
                     "if it is a target too, exclude it (--exclude A,B,C; '--exclude A B C' makes B and C sources)")


def check_out_dir(out: Path, sources: Sequence[SourceSpec]) -> None:
    """Refuse an output folder that is a source folder or lies inside one.

    The corpus's report figures (``report/*.png``) would then be images of that source: a later build
    of it read them (and, with ``--channels 3``, kept them as pre-training images).

    Raises:
        ValueError: naming the source and the fix.
    """
    dst = Path(out).resolve()
    for s in sources:
        src = Path(s.root).resolve()
        if src.is_dir() and (dst == src or src in dst.parents):
            raise ValueError(f"--out {out} is {'inside ' if dst != src else ''}the source folder '{s.name}' ({s.root}): "
                             "a later build of that source would read the corpus's report figures as images; "
                             "choose an --out outside every source folder")


def check_build_args(
    channels: int | str,
    image_size: int,
    resize_mode: str,
    shard_size: int,
    chunk_items: int,
    num_parts: int,
    part: int,
    sources: Sequence[SourceSpec],
) -> None:
    """Refuse arguments of ``build_corpus`` that cannot give a corpus (a ``ValueError`` with the fix)."""
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
