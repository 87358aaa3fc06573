"""Image sources: what a source is (``SourceSpec``), the items it holds (``iter_source``), and
reading one item (``read_item``).

A source is one folder, manifest or archive with one licence and modality. Enumeration is cheap
(no pixels are decoded) so a corpus builder can plan, split by group and count before reading.
Problems of individual files (missing, corrupt...) surface as ``SkipImage`` when the item is read,
so they are counted per reason instead of aborting the build.

Formats:

================ =======================================================================
``labels_csv``   ``root/labels.csv`` with columns ``path,label,split,group`` (path relative to
                 ``root``; empty cells mean unknown). The layout of ``../shared/data``.
``csv``          any CSV (``csv_file``) whose columns are named by ``columns``, e.g.
                 ``{"path": "image_id", "label": "dx", "group": "lesion_id"}``.
``class_folders`` ``root/<class>/**/image``: the first-level folder name is the label.
``flat``         every image under ``root``, unlabelled.
``npz``          MedMNIST-style ``.npz`` (``root`` is the file or a folder of them); one item
                 per array row, ``frame=(split, row)``.
``dicom``        every DICOM file under ``root`` (by suffix or ``DICM`` magic); group = PatientID.
``nifti``        every ``.nii``/``.nii.gz`` under ``root``; slices are read by ``read_item``.
``auto``         ``labels.csv`` present -> labels_csv; ``.npz`` at the top -> npz; images at
                 the top -> flat; images only in sub-folders -> class_folders.
================ =======================================================================
"""

from __future__ import annotations

import contextlib
import csv
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np

from openmednet._errors import look_up_option
from openmednet.data.readers import ImageMeta, SkipImage, check_reader_options, get_reader, read_images
from openmednet.data.readers.base import printable_path
from openmednet.data.readers.dicom import DicomReader
from openmednet.data.readers.nifti import NiftiReader
from openmednet.data.readers.npz import label_str, list_splits, load_split, read_row
from openmednet.data.readers.pil import PILReader

logger = logging.getLogger(__name__)

SOURCE_FORMATS = ("labels_csv", "class_folders", "flat", "csv", "npz", "dicom", "nifti", "auto")
MANIFEST_COLUMNS = ("path", "label", "split", "group")

#: File endings enumerated in folders (``.npz`` is its own format, not a folder image).
IMAGE_SUFFIXES = PILReader.suffixes + DicomReader.suffixes + NiftiReader.suffixes

#: The manifest of a labelled folder (``path,label,split,group``); with it, only the listed files are read.
LABELS_CSV = "labels.csv"

#: The skip reason of a manifest row that repeats an earlier row exactly (``drop_repeated_rows``).
DUPLICATE_ROW = "duplicate_row"

_Row = TypeVar("_Row")

#: Addresses one image inside a file: a frame/slice index, an ``.npz`` ``(split, row)``, or
#: ``None`` for every image of the file.
FrameSelector = Union[int, tuple[str, int], None]


@dataclass(frozen=True)
class SourceSpec:
    """Where a source's images are and what they are.

    Attributes:
        name: short unique id (used in reports and ``ImageMeta.source``).
        root: folder (or ``.npz`` file) of the source.
        format: one of ``SOURCE_FORMATS``; ``"auto"`` detects it (see the module docstring).
        columns: for ``format="csv"``: our column name (``path``, ``label``, ``split``,
            ``group``) -> the CSV's column name. ``path`` is required.
        csv_file: for ``format="csv"``: the CSV, relative to ``root`` (or absolute).
        label_map: optional renaming of raw labels (``{"0": "normal", "1": "pneumonia"}``);
            labels not in the map are kept as they are.
        modality: e.g. ``"CT"``, ``"MR"``, ``"XR"``, ``"US"``, ``"dermoscopy"``; used when the file
            does not say (a DICOM's own Modality wins).
        license: licence of the source's images (carried into corpus reports).
        channels: hint: 1 for gray sources, 3 for colour, ``None`` to route by content.
        reader_options: passed to the reader (e.g. ``{"axis": 0, "stride": 2}`` for NIfTI).
        allow_outside_root: read files that resolve outside ``root`` (manifest rows such as
            ``../x.png`` or absolute paths, symlinks out of the folder). Off by default: such a
            file is skipped as ``"outside_root"``, because a manifest that reaches elsewhere can
            pull a target set's images into a corpus unseen.
    """

    name: str
    root: Path
    format: str = "auto"
    columns: Mapping[str, str] = field(default_factory=dict)
    csv_file: Path | None = None
    label_map: Mapping[str, str] = field(default_factory=dict)
    modality: str = ""
    license: str = ""
    channels: int | None = None
    reader_options: Mapping[str, Any] = field(default_factory=dict)
    allow_outside_root: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        look_up_option(self.format, SOURCE_FORMATS, "source format")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"source '{self.name}': channels must be 1, 3 or None, got {self.channels!r}")
        if self.format == "csv" and "path" not in self.columns:
            raise ValueError(
                f"source '{self.name}': format 'csv' needs columns={{'path': <csv column>, ...}}; got {dict(self.columns)}"
            )
        check_reader_options(self.reader_options)
        unknown = set(self.columns) - set(MANIFEST_COLUMNS)
        if unknown:
            raise ValueError(f"source '{self.name}': unknown column keys {sorted(unknown)}; valid: {MANIFEST_COLUMNS}")


@dataclass(frozen=True)
class SourceItem:
    """One enumerated entry of a source: a file (or one image inside it) with its annotations.

    Attributes:
        path: the file.
        frame: ``None`` (every image in the file), a frame/slice index, or ``(split, row)`` for
            an ``.npz`` row.
        label, split, group: annotations from the source (``None`` = unknown).
        source: the ``SourceSpec.name``.
        modality: the ``SourceSpec.modality``.
        reader_options: the ``SourceSpec.reader_options``.
        root: the source root that ``path`` must resolve inside (``read_item`` skips it as
            ``"outside_root"`` otherwise); ``None`` = no check (``allow_outside_root``).
    """

    path: Path
    frame: FrameSelector = None
    label: str | None = None
    split: str | None = None
    group: str | None = None
    source: str = ""
    modality: str = ""
    reader_options: Mapping[str, Any] = field(default_factory=dict)
    root: Path | None = None


def detect_format(root: Path) -> str:
    """Detect the format of a source root (the ``"auto"`` rule of the module docstring).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: nothing readable found (the message says what was looked for).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"source root not found: {root}")
    if root.is_file():
        if root.name.lower().endswith(".npz"):
            return "npz"
        raise ValueError(f"source root {root} is a file; expected a folder or a .npz (for a CSV use format='csv')")
    if (root / LABELS_CSV).is_file():
        return "labels_csv"
    top = [p for p in root.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() and p.name.lower().endswith(".npz") for p in top):
        return "npz"
    if any(p.is_file() and _is_image_name(p) for p in top):
        return "flat"
    if any(p.is_dir() and next(_image_files(p), None) is not None for p in top):
        return "class_folders"
    raise ValueError(
        f"no images found under {root}: expected labels.csv, .npz files, or images ({', '.join(IMAGE_SUFFIXES)}) "
        "at the top or in class sub-folders"
    )


def iter_source(spec: SourceSpec) -> Iterator[SourceItem]:
    """Enumerate a source's items without decoding pixels, in a deterministic (sorted) order.

    Raises:
        FileNotFoundError: the root (or the CSV) does not exist.
        ValueError: a manifest lacks required columns, or ``auto`` finds nothing.
    """
    fmt = detect_format(spec.root) if spec.format == "auto" else spec.format
    if not spec.root.exists():
        raise FileNotFoundError(f"source '{spec.name}': root not found: {spec.root}")
    enumerate_items = _ENUMERATORS[fmt]
    yield from enumerate_items(spec)


def read_item(item: SourceItem, *, on_skip: Callable[[SkipImage], None] | None = None) -> Iterator[tuple[np.ndarray, ImageMeta]]:
    """Read the image(s) an item refers to, with the item's source facts in each ``ImageMeta``.

    The meta gets ``source`` from the item, and ``label``, ``split``, ``group`` from the item when
    it has them (else what the reader found, e.g. an ``.npz`` row's label); ``modality`` comes from
    the file when it states one (DICOM), else from the item.

    Args:
        item: from ``iter_source``.
        on_skip: as in ``read_images``: receives every ``SkipImage`` (then nothing raises);
            ``None`` raises for an unusable file (e.g. ``"missing_file"``).

    Yields:
        ``(array, meta)`` with ``array`` ``(H, W)`` or ``(H, W, 3)`` uint8.
    """
    try:
        check_inside_root(item.path, item.root)
        for arr, meta in _read_raw(item, on_skip):
            meta.source = item.source
            # The item's annotations win; the reader's (an npz row's label and split) fill gaps.
            meta.label = item.label if item.label is not None else meta.label
            meta.split = item.split if item.split is not None else meta.split
            meta.group = item.group if item.group is not None else meta.group
            meta.modality = meta.modality or item.modality
            yield arr, meta
    except SkipImage as skip:
        if on_skip is None:
            raise
        on_skip(skip)


def drop_repeated_rows(rows: Iterable[_Row], key: Callable[[_Row], Hashable], skipped: Counter[str]) -> list[_Row]:
    """``rows`` in order without the rows whose ``key`` repeats an earlier row's; each one left out
    counts as a ``"duplicate_row"`` skip in ``skipped``.

    For the manifests of labelled targets (``labels.csv``, another CSV, ``masks.csv``): a row listed
    twice would be trained on twice, and counted twice, in every run. ``key`` holds every column
    the reader uses, so only exact repeats go: the same image listed with another label (one image
    with two labels, BUSI's upstream error) stays, for the label-conflict check to drop both. Paths
    go into ``key`` resolved (``os.path.realpath``): ``a.jpg``, ``./a.jpg``, ``sub/../a.jpg``, the
    absolute path and a link to it are one file, which the text of the row alone did not tell.
    """
    seen: set[Hashable] = set()
    kept = []
    for row in rows:
        k = key(row)
        if k in seen:
            skipped[DUPLICATE_ROW] += 1
            continue
        seen.add(k)
        kept.append(row)
    return kept


def _read_raw(item: SourceItem, on_skip: Callable[[SkipImage], None] | None) -> Iterator[tuple[np.ndarray, ImageMeta]]:
    frame = item.frame
    if isinstance(frame, list):  # a (split, row) selector that went through JSON
        frame = tuple(frame)
    if isinstance(frame, tuple):
        if len(frame) != 2:
            raise ValueError(f"npz frame selector must be (split, row), got {item.frame!r}")
        split, row = frame
        try:
            yield read_row(item.path, split, row)
        except (KeyError, IndexError) as e:
            raise SkipImage("missing_file", f"npz row not found ({e})", item.path, row) from e
        return
    if frame is not None and not isinstance(frame, int):
        raise ValueError(f"frame selector must be None, an int or (split, row), got {item.frame!r}")
    if frame is not None and on_skip is not None:
        # Only the requested frame's skips concern this item (the others belong to other items).
        outer = on_skip
        on_skip = lambda skip: outer(skip) if skip.frame in (None, frame) else None  # noqa: E731
    try:
        reader = get_reader(item.path, **dict(item.reader_options))
    except ValueError as e:  # no reader for this file name (a manifest row naming a .txt...)
        raise SkipImage("unsupported_format", str(e), item.path) from e
    for arr, meta in read_images(item.path, reader, on_skip=on_skip):
        if frame is None or meta.frame == frame:
            yield arr, meta


# --- enumerators -------------------------------------------------------------------------------


def _is_image_name(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def _image_files(folder: Path) -> Iterator[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files and folders excluded).

    Links that lead nowhere (loops, missing targets) with an image name are listed too: reading
    them reports a ``"broken_link"`` skip instead of the file silently vanishing.
    """
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        usable = path.is_file() or _is_broken_link(path)
        if usable and _is_image_name(path) and not any(part.startswith(".") for part in rel.parts):
            yield path


def _item(
    spec: SourceSpec,
    path: Path,
    frame: FrameSelector = None,
    label: str | None = None,
    split: str | None = None,
    group: str | None = None,
) -> SourceItem:
    if label is not None:
        label = spec.label_map.get(label, label)
    return SourceItem(
        path=path,
        frame=frame,
        label=label,
        split=split,
        group=group,
        source=spec.name,
        modality=spec.modality,
        reader_options=spec.reader_options,
        root=None if spec.allow_outside_root else spec.root,
    )


def check_inside_root(path: Path, root: Path | None) -> None:
    """Raise ``SkipImage("outside_root")`` when ``path`` (links followed) is not under ``root``.

    ``root`` may be a folder or, for a single-file source (an ``.npz``), the file itself.
    ``None`` checks nothing.
    """
    if root is None:
        return
    try:
        real, base = Path(path).resolve(), Path(root).resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13): the reader reports it
        return
    if real != base and base not in real.parents:
        raise SkipImage(
            "outside_root",
            f"resolves to {printable_path(real)}, outside the source folder {printable_path(base)}; "
            "move the file into the folder, or allow it explicitly (--allow-outside-root)",
            path,
        )


def _iter_manifest(spec: SourceSpec, csv_path: Path, columns: Mapping[str, str]) -> Iterator[SourceItem]:
    """Rows of a CSV manifest; ``columns`` maps our names to the CSV's header names."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"source '{spec.name}': manifest not found: {csv_path}")
    with _open_csv(spec, csv_path) as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in columns.values() if c not in header]
        if missing:
            raise ValueError(f"source '{spec.name}': {csv_path} lacks columns {missing}; it has {header}")
        for row in reader:
            values = {ours: (row.get(theirs) or "").strip() or None for ours, theirs in columns.items()}
            if values["path"] is None:
                logger.warning("source '%s': row without a path in %s: %s", spec.name, csv_path, row)
                continue
            yield _item(spec, spec.root / values["path"], None, values.get("label"), values.get("split"), values.get("group"))


@contextlib.contextmanager
def _open_csv(spec: SourceSpec, csv_path: Path) -> Iterator[Iterator[str]]:
    """The manifest's lines as text; a file that is not UTF-8 is named, with the fix."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        try:
            yield f
        except UnicodeDecodeError as e:
            raise ValueError(
                f"source '{spec.name}': {csv_path} is not UTF-8 (cannot decode byte {e.object[e.start]:#04x}); "
                "re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
            ) from None


def _iter_labels_csv(spec: SourceSpec) -> Iterator[SourceItem]:
    csv_path = spec.root / LABELS_CSV
    with _open_csv(spec, csv_path) as f:
        header = next(csv.reader(f), [])
    if "path" not in header:
        raise ValueError(
            f"source '{spec.name}': {csv_path} must have a 'path' column (and optionally label,split,group); got {header}"
        )
    yield from _iter_manifest(spec, csv_path, {c: c for c in MANIFEST_COLUMNS if c in header})


def _iter_csv(spec: SourceSpec) -> Iterator[SourceItem]:
    if spec.csv_file is None:
        raise ValueError(f"source '{spec.name}': format 'csv' needs csv_file=<path of the CSV>")
    csv_path = spec.csv_file if Path(spec.csv_file).is_absolute() else spec.root / spec.csv_file
    yield from _iter_manifest(spec, Path(csv_path), spec.columns)


def _iter_class_folders(spec: SourceSpec) -> Iterator[SourceItem]:
    for folder in sorted(p for p in spec.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in _image_files(folder):
            yield _item(spec, path, label=folder.name)


def _iter_flat(spec: SourceSpec) -> Iterator[SourceItem]:
    for path in _image_files(spec.root):
        yield _item(spec, path)


def _iter_npz(spec: SourceSpec) -> Iterator[SourceItem]:
    files = [spec.root] if spec.root.is_file() else sorted(spec.root.glob("*.npz"))
    for path in files:
        for split in list_splits(path):
            images, labels = load_split(path, split)
            for row in range(len(images)):
                label = None if labels is None else label_str(labels[row])
                yield _item(spec, path, (split, row), label, split)


def _is_broken_link(path: Path) -> bool:
    """A link that leads nowhere (missing target or a loop)."""
    return path.is_symlink() and not path.exists()


def _candidate_files(root: Path) -> list[Path]:
    """Files under ``root`` (or ``root`` itself), broken links included, so that reading them
    reports a ``"broken_link"`` skip instead of the file silently vanishing."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() or _is_broken_link(p))


def _iter_dicom(spec: SourceSpec) -> Iterator[SourceItem]:
    dicom = DicomReader()
    for path in _candidate_files(spec.root):
        # DICOM files often have no suffix: a broken link cannot be told apart, so it is listed.
        if _is_broken_link(path):
            yield _item(spec, path)
        elif dicom.can_read(path):
            yield _item(spec, path, group=_patient_id(path))


def _patient_id(path: Path) -> str | None:
    """PatientID from the header only (no pixels), for group-aware splits; ``None`` if unreadable."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        return str(ds.get("PatientID", "")).strip() or None
    except Exception:  # noqa: BLE001 - unreadable files are reported when read, not here
        return None


def _iter_nifti(spec: SourceSpec) -> Iterator[SourceItem]:
    nifti = NiftiReader()
    for path in _candidate_files(spec.root):
        if nifti.verify_suffix(path):
            yield _item(spec, path)


_ENUMERATORS: dict[str, Callable[[SourceSpec], Iterator[SourceItem]]] = {
    "labels_csv": _iter_labels_csv,
    "csv": _iter_csv,
    "class_folders": _iter_class_folders,
    "flat": _iter_flat,
    "npz": _iter_npz,
    "dicom": _iter_dicom,
    "nifti": _iter_nifti,
}
