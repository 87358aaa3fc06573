"""``openmednet corpus``: build, inspect and merge pre-training corpora.

Examples::

    openmednet corpus build data/gray/pretrain/* --out corpus_gray64 --size 64 \\
        --exclude data/gray/targets/busi,data/gray/targets/openi_abd_vs_cxr --workers 8
    openmednet corpus build SRC... --out part0 --channels 1 --num-parts 4 --part 0   # one machine
    openmednet corpus merge part0 part1 part2 part3 --out corpus_gray
    openmednet corpus inspect corpus_gray64
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperCommand

_STAGES = {
    "plan": "enumerating sources",
    "targets": "hashing exclusion targets",
    "decode": "decoding images",
    "write": "writing shards",
}


def _parse_channels(value: str) -> int | str:
    if value not in ("auto", "1", "3"):
        raise ValueError(f"--channels must be auto, 1 (gray) or 3 (colour), got {value!r}")
    return value if value == "auto" else int(value)


class _ArgvCommand(TyperCommand):
    """Keeps the raw arguments in ``ctx.meta["argv"]``: only their order shows that a bare
    ``--exclude A B C`` turned B and C into sources."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)


def _check_exclude_order(argv: list[str]) -> None:
    """Refuse sources written right after an ``--exclude`` value (``--exclude A B C``).

    Typer options take one value, so B and C there become pre-training *sources*: the very leak
    the exclusion exists to prevent. Intent cannot be told apart, so the order is refused.
    """
    for i, token in enumerate(argv):
        if token == "--exclude" and i + 1 < len(argv):
            value, rest = argv[i + 1], argv[i + 2 :]
        elif token.startswith("--exclude="):
            value, rest = token.split("=", 1)[1], argv[i + 1 :]
        else:
            continue
        stray = list(itertools.takewhile(lambda t: not t.startswith("-"), rest))
        if stray:
            raise ValueError(
                f"{', '.join(stray)}: written after '--exclude {value}', read as pre-training SOURCES; exclude "
                f"several targets with --exclude {','.join([value, *stray])}, and list sources before the options"
            )


def _split_exclude(values: list[str]) -> list[Path]:
    """``--exclude A,B --exclude C`` -> ``[A, B, C]`` (Typer options take one value each)."""
    return [Path(v.strip()) for value in values for v in value.split(",") if v.strip()]


def _parse_sources(paths: list[str], modalities: list[str], allow_outside_root: bool = False) -> list:
    """``[NAME=]PATH`` arguments -> ``SourceSpec`` (name defaults to the folder name)."""
    from openmednet.data.sources import SourceSpec

    mods = {}
    for m in modalities:
        if "=" not in m:
            raise ValueError(f"--modality expects NAME=MODALITY (e.g. brain_tumor_mri=MR), got {m!r}")
        k, v = m.split("=", 1)
        mods[k] = v
    specs = []
    for arg in paths:
        name, _, path = arg.rpartition("=") if "=" in arg else ("", "", arg)
        if not path.strip():  # Path("") is ".": 'knee=' built a corpus of the working directory
            raise ValueError(f"source {arg!r} names no path: give NAME=PATH, e.g. knee_oa=data/knee_oa")
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(
                f"source not found: {root} (expected a folder with images or labels.csv, or a .npz)"
            )
        # resolve(): the name of '.' or '..' is '', a source the report and merge could not name.
        name = name or (root.stem if root.is_file() else root.resolve().name)
        if not name:
            raise ValueError(f"source {arg!r} has no name: give NAME=PATH")
        specs.append(SourceSpec(name=name, root=root, modality=mods.get(name, ""), allow_outside_root=allow_outside_root))
    unknown = set(mods) - {s.name for s in specs}
    if unknown:
        raise ValueError(f"--modality names {sorted(unknown)} match no source; sources are {[s.name for s in specs]}")
    return specs


class _RichProgress:
    """Adapter from the library's ``progress(stage, done, total)`` callback to rich bars."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(_STAGES.get(stage, stage), total=total or None)
        self.progress.update(self.tasks[stage], completed=done, total=total or None)


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


@contextlib.contextmanager
def _loud_warnings(console: Console) -> Iterator[None]:
    """Print the builder's ``CorpusWarning``s in bold red as they come (above the progress bars):
    a target used as a source must not scroll by as a log line."""
    from openmednet.data.corpus import CorpusWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", CorpusWarning)
        default = warnings.showwarning

        def show(message, category, *args, **kwargs) -> None:  # noqa: ANN001 - the warnings hook's signature
            if issubclass(category, CorpusWarning):
                console.print(f"[bold red]warning:[/] {escape(str(message))}", highlight=False)
            else:
                default(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def _summary(manifest, out: Path) -> None:
    table = Table(title=str(out), show_header=False)
    table.add_row("images", f"{manifest.num_images:,}")
    table.add_row("shards", str(len(manifest.shards)))
    table.add_row("image", f"{manifest.channels} x {manifest.image_size} x {manifest.image_size} uint8")
    table.add_row("labels", str(len(manifest.label_names)))
    for name, n in sorted(manifest.stats.get("per_source", {}).items()):
        table.add_row(f"source {name}", f"{n:,}")
    for reason, n in sorted(manifest.stats.get("dropped", {}).items()):
        table.add_row(f"dropped: {reason}", f"{n:,}")
    for reason, n in sorted(manifest.stats.get("skipped", {}).items()):
        table.add_row(f"skipped: {reason}", f"{n:,}")
    table.add_row("report", str(out / "report.md"))
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add the ``corpus`` command group to ``app``."""
    group = typer.Typer(help="Build, inspect and merge pre-training corpora.", no_args_is_help=True)
    app.add_typer(group, name="corpus")

    @group.command("build", cls=_ArgvCommand)
    def build_cmd(
        ctx: typer.Context,
        sources: list[str] = typer.Argument(..., help="Source folders or .npz files, optionally NAME=PATH."),
        out: Path = typer.Option(..., "--out", help="Corpus directory (an unfinished build there is resumed)."),
        channels: str = typer.Option(
            "auto", help="auto (the family of most source images), 1 = gray, 3 = colour (images routed by content)."
        ),
        size: int = typer.Option(256, help="Stored image side in pixels."),
        resize_mode: str = typer.Option("pad", help="pad (keep the whole image) or crop (centre crop)."),
        exclude: list[str] = typer.Option(
            [], "--exclude", help="Target sets (folders or .npz) kept out, with their near copies: --exclude A,B,C "
            "or repeat --exclude (a bare '--exclude A B C' makes B and C sources)."
        ),
        allow_outside_root: bool = typer.Option(
            False, help="Read labels.csv rows and symlinks that lead outside their source folder (else skipped)."
        ),
        modality: list[str] = typer.Option([], "--modality", help="NAME=MODALITY for a source, e.g. knee_oa=XR."),
        workers: int = typer.Option(2, help="Decoding processes."),
        shard_size: int = typer.Option(2048, help="Images per shard."),
        num_parts: int = typer.Option(1, help="Split the build over this many machines..."),
        part: int = typer.Option(0, help="...and build this part (0-based); join with `corpus merge`."),
        near_threshold: int = typer.Option(6, help="phash Hamming threshold (bits of 64) for near duplicates."),
        seed: int = typer.Option(0, help="Seed of the split assignment for sources without splits."),
    ) -> None:
        """Build (or resume) a corpus of uint8 shards with a manifest and a report."""
        from openmednet.data.corpus import build_corpus, target_spec

        _check_exclude_order(ctx.meta.get("argv", []))
        specs = _parse_sources(sources, modality, allow_outside_root)
        targets = [target_spec(t) for t in _split_exclude(exclude)]
        with _progress_bar() as bar, _loud_warnings(bar.console):
            manifest = build_corpus(
                specs, out, channels=_parse_channels(channels), image_size=size, resize_mode=resize_mode,
                exclude=targets, workers=workers, shard_size=shard_size, num_parts=num_parts, part=part, seed=seed,
                near_threshold=near_threshold, progress=_RichProgress(bar),
            )  # fmt: skip
        _summary(manifest, out)

    @group.command("merge")
    def merge_cmd(
        parts: list[Path] = typer.Argument(..., help="Part corpora built with --num-parts/--part."),
        out: Path = typer.Option(..., "--out", help="Merged corpus directory."),
        shard_size: int = typer.Option(0, help="Images per shard (0 = as the parts)."),
    ) -> None:
        """Merge part corpora, removing duplicates and leakage across parts."""
        from openmednet.data.corpus import merge_parts

        with _progress_bar() as bar:
            manifest = merge_parts(parts, out, shard_size=shard_size or None, progress=_RichProgress(bar))
        _summary(manifest, out)

    @group.command("inspect")
    def inspect_cmd(
        corpus: Path = typer.Argument(..., help="Corpus directory."),
        report: bool = typer.Option(False, "--report", help="Rewrite report.md and its plots from the manifest."),
    ) -> None:
        """Summarise a corpus (counts, drops, skips) from its manifest."""
        from openmednet.data.report import write_report
        from openmednet.data.shards import CorpusManifest

        manifest = CorpusManifest.load(corpus)
        if report:
            write_report(manifest, corpus)
        _summary(manifest, corpus)
