"""The corpus build report: ``report.md`` plus PNG plots, from a manifest's statistics alone.

Everything shown comes from ``CorpusManifest.stats`` (written by ``build_corpus`` /
``merge_parts``), so ``openmednet corpus inspect DIR --report`` can regenerate the report of any
corpus without touching its pixels. Files are written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from openmednet.data.shards import CorpusManifest
from openmednet.utils import atomic_write_bytes, atomic_write_text

REPORT = "report.md"
PLOT_DIR = "report"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _counts(title: str, counts: Mapping[str, int], key: str) -> str:
    if not counts:
        return f"### {title}\n\nnone\n"
    total = sum(counts.values())
    rows = [(k, v, f"{100 * v / total:.1f}%") for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return f"### {title}\n\n" + _table((key, "images", "share"), rows)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A figure on its own Agg canvas, not through ``pyplot``: the caller's global matplotlib
    backend is left alone (as ``engine.plots`` does), and nothing needs closing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _bar_plot(counts: Mapping[str, int], title: str) -> bytes:
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    fig, ax = _figure((7, 0.35 * max(len(items), 3) + 1))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#4c72b0")
    ax.set_xlabel("images")
    ax.set_title(title)
    return _png(fig)


def _size_plot(bins: Sequence[int], hist: Mapping[str, Sequence[int]]) -> bytes:
    import numpy as np

    labels = [f">={b}" for b in bins]
    fig, ax = _figure((8, 4))
    bottom = np.zeros(len(bins))
    for name, counts in sorted(hist.items()):
        ax.bar(labels, counts, bottom=bottom, label=name)
        bottom += np.asarray(counts)
    ax.set_xlabel("original longer side (px)")
    ax.set_ylabel("images")
    ax.set_title("Original image sizes (kept images)")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def _duplicates(stats: Mapping[str, Any]) -> str:
    intro = (
        f"## Duplicates (64-bit phash within {stats.get('near_threshold')} bits, confirmed by the 256-bit phash "
        f"within {stats.get('confirm_threshold')} bits)\n\nClusters are counted over all decoded images, before any "
        "removal; a cluster spans source splits when its images carry different splits in their source.\n\n"
    )
    out = [intro]
    rows = []
    for kind in ("exact", "near"):
        d = stats.get(kind) or {}
        rows.append(
            (
                kind,
                d.get("clusters", 0),
                d.get("images", 0),
                d.get("within_source", 0),
                d.get("across_sources", 0),
                d.get("across_splits", 0),
            )
        )
    out.append(
        _table(
            ("kind", "clusters", "images in clusters", "within one source", "across sources", "across source splits"),
            rows,
        )
    )
    for kind in ("exact", "near"):
        pairs = (stats.get(kind) or {}).get("source_pairs") or {}
        if pairs:
            out.append(
                f"\n{kind.capitalize()} clusters shared by sources:\n\n"
                + _table(("sources", "clusters"), list(pairs.items()))
            )
    dropped = stats.get("dropped") or {}
    out.append(
        "\nDropped by the de-duplication and exclusion rules:\n\n"
        + (_table(("reason", "images"), sorted(dropped.items())) if dropped else "none\n")
    )
    by_source = stats.get("dropped_by_source") or {}
    if by_source:
        reasons = sorted({r for v in by_source.values() for r in v})
        rows = [(s, *(v.get(r, 0) for r in reasons)) for s, v in sorted(by_source.items())]
        out.append("\n" + _table(("source", *reasons), rows))
    conflicts = stats.get("label_conflicts") or []
    out.append(f"\n### Label conflicts (same image, different labels in one source): {len(conflicts)}\n\n")
    out += [f"- {', '.join(c['labels'])}: {'; '.join(c['images'])}\n" for c in conflicts[:50]]
    return "".join(out)


def _exclusion(ex: Mapping[str, Any]) -> str:
    if not ex or not ex.get("targets"):
        return "## Exclusion targets\n\nnone given\n"
    rows = []
    for name, per in ex["targets"].items():
        detail = ", ".join(f"{s}: {n}" for s, n in sorted(per.items())) or "-"
        found = ex.get("target_images_found", {}).get(name, "?")
        rows.append((name, ex.get("target_images", {}).get(name, "?"), found, sum(per.values()), detail))
    out = "## Exclusion targets\n\nCorpus images equal to, or near copies of, a target image were dropped.\n\n"
    out += _table(
        (
            "target",
            "target images",
            "target images with a copy in the pools",
            "corpus images dropped",
            "per corpus source",
        ),
        rows,
    )
    td = ex.get("target_duplicates") or {}
    if td:
        e, n = td.get("exact", {}), td.get("near", {})
        out += (
            f"\nInside the targets: {e.get('clusters', 0)} exact-duplicate clusters ({e.get('across_splits', 0)} across the "
            f"targets' own splits), {n.get('clusters', 0)} near-duplicate clusters ({n.get('across_splits', 0)} across splits).\n"
        )
        for c in td.get("label_conflicts", [])[:20]:
            out += f"- label conflict {', '.join(c['labels'])}: {'; '.join(c['images'])}\n"
    if ex.get("target_skipped"):
        out += (
            "\nTarget files that could not be hashed: "
            + ", ".join(f"{k} ({v})" for k, v in ex["target_skipped"].items())
            + "\n"
        )
    return out


def _skips(stats: Mapping[str, Any]) -> str:
    skipped = stats.get("skipped") or {}
    out = f"## Files skipped: {sum(skipped.values())}\n\n"
    if not skipped:
        return out + "none\n"
    out += _table(("reason", "images/files"), sorted(skipped.items(), key=lambda kv: -kv[1]))
    by_source = stats.get("skipped_by_source") or {}
    reasons = sorted(skipped)
    out += "\n" + _table(
        ("source", *reasons), [(s, *(v.get(r, 0) for r in reasons)) for s, v in sorted(by_source.items())]
    )
    for reason, examples in sorted((stats.get("skip_examples") or {}).items()):
        out += f"\nExamples of `{reason}`:\n" + "".join(f"- `{e}`\n" for e in examples)
    return out


def render_markdown(manifest: CorpusManifest, plots: Mapping[str, str]) -> str:
    """The report text for ``manifest`` (``plots`` maps plot names to relative PNG paths)."""
    st, b = manifest.stats, manifest.build
    kind = "gray" if manifest.channels == 1 else "colour"
    header = (
        f"# Corpus report\n\n{manifest.num_images} images, {kind} ({manifest.channels} channel), "
        f"{manifest.image_size} px ({b.get('resize_mode', '?')}), {len(manifest.shards)} shards, "
        f"format version {manifest.version}.\n\nBuild: {', '.join(f'{k}={v}' for k, v in b.items() if k != 'exclude')}\n"
    )
    parts = [
        header,
        "## Contents\n",
        _counts("Per source", st.get("per_source", {}), "source"),
        _counts("Per modality", st.get("per_modality", {}), "modality"),
        _counts("Per split", st.get("per_split", {}), "split"),
        _counts("Per label", st.get("per_label", {}), "source/label"),
    ]
    parts += [f"![{name}]({rel})\n" for name, rel in plots.items()]
    parts += [_duplicates(st), _exclusion(st.get("exclusion", {})), _skips(st)]
    return "\n".join(parts)


Figures = dict[str, tuple[str, bytes]]
"""The report's plots: caption -> (path relative to the corpus, PNG bytes)."""


def draw_figures(stats: Mapping[str, Any]) -> Figures:
    """The report's plots, drawn from a manifest's ``stats`` alone and returned, not written.

    Drawing is the slow part of a report (about a second of matplotlib per build, whatever the
    corpus size) and needs no file, so a build with spare workers draws the plots in another
    process while it writes the shards (``openmednet.data.corpus._build``), and writes them after
    the manifest like any other report.
    """
    figures: Figures = {}
    if stats.get("per_source"):
        png = _bar_plot(stats["per_source"], "Images per source")
        figures["images per source"] = (f"{PLOT_DIR}/per_source.png", png)
    if stats.get("per_label"):
        figures["images per label"] = (f"{PLOT_DIR}/per_label.png", _bar_plot(stats["per_label"], "Images per label"))
    if stats.get("size_hist"):
        figures["original sizes"] = (f"{PLOT_DIR}/sizes.png", _size_plot(stats["size_bins"], stats["size_hist"]))
    return figures


def write_report(manifest: CorpusManifest, out_dir: str | Path, figures: Figures | None = None) -> Path:
    """Write ``out_dir/report.md`` and its plots under ``out_dir/report/``.

    Args:
        manifest: the corpus manifest (everything shown comes from it).
        out_dir: the corpus directory.
        figures: ``draw_figures(manifest.stats)``, if drawn already; ``None``: drawn here.

    Returns:
        The path of ``report.md``.
    """
    out = Path(out_dir)
    if figures is None:
        figures = draw_figures(manifest.stats)
    for rel, png in figures.values():
        atomic_write_bytes(out / rel, png)
    path = out / REPORT
    atomic_write_text(path, render_markdown(manifest, {name: rel for name, (rel, _) in figures.items()}))
    return path
