"""Target data sets for fine-tuning: labelled images decoded once into memory, checked for the
problems that silently spoil a transfer study.

Small targets (tens to a few thousand images) fit in memory after decoding, so every epoch reuses
the decoded pixels; images are stored with their shorter side at most ``max_side`` pixels (the
evaluation transform resizes the shorter side and centre-crops, so nothing it uses is lost).

Checks, each a clear error:

- manifest paths that do not exist (``FileNotFoundError`` with the count and examples);
- labels outside the expected classes (``ValueError``, "did you mean");
- a class with a single image (it cannot be both trained on and tested);
- files no reader can decode are skipped with a warning that counts them per reason, and so are
  manifest rows that repeat an earlier row exactly (``"duplicate_row"``: used once, not trained on
  twice); the same image listed with two labels is kept for ``prepare_splits`` to drop.

Unlabelled rows (e.g. ISIC 2017's test part) are left out, with a log line.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from openmednet._errors import did_you_mean
from openmednet.data.decoded import GRAY_TOLERANCE, DecodedItems, majority_channels
from openmednet.data.dedupe import phashes
from openmednet.data.images import shrink, to_channels
from openmednet.data.segmentation import MASKS_CSV
from openmednet.data.sources import (
    SourceItem,
    SourceSpec,
    drop_repeated_rows,
    iter_source,
    read_item,
)

__all__ = ["TargetSet", "load_target"]

logger = logging.getLogger(__name__)


def _majority_channels(images: list[np.ndarray], root: Path) -> int:
    """``data.decoded.majority_channels``, warning when the other kind is converted."""
    channels, minority = majority_channels(images, GRAY_TOLERANCE)
    if minority:
        kind = "colour" if channels == 1 else "gray"
        warnings.warn(
            f"{root}: {minority} of {len(images)} images have {kind} content; they are converted to "
            f"{channels} channel(s) like the majority",
            stacklevel=3,
        )
    return channels


@dataclass
class TargetSet(DecodedItems):
    """Decoded labelled images of one target.

    Attributes:
        images: ``N`` uint8 arrays, ``(H, W)`` for gray content, ``(H, W, 3)`` for colour.
        labels: ``(N,)`` class names (str).
        groups: ``N`` patient/lesion ids, ``None`` when unknown (the file path for multi-image files).
        given_splits: ``N`` split names from the source, ``None`` when not given.
        ids: ``N`` stable ids: path relative to the data root, ``#frame`` or ``#split/row`` suffixed.
        label_names: sorted class names; class ``k`` is ``label_names[k]``.
        channels: 1 if most images have gray content, else 3 (the minority is converted, warned).
        hashes: ``(N,)`` uint64 perceptual hashes of the decoded images (``data.dedupe.phash64``).
        fine_hashes: ``(N, 4)`` uint64 256-bit perceptual hashes (``data.dedupe.phash256``), which
            confirm near-copy candidates of ``hashes``.
        root: where the data came from.
        skipped: count of skipped files or manifest rows per reason (``"duplicate_row"``,
            ``"outside_root"``, undecodable files...).
    """

    images: list[np.ndarray]
    labels: np.ndarray
    groups: list[str | None]
    given_splits: list[str | None]
    ids: list[str]
    label_names: tuple[str, ...]
    channels: int
    hashes: np.ndarray
    fine_hashes: np.ndarray
    root: Path
    skipped: dict[str, int] = field(default_factory=dict)

    # ``y``, ``len`` and ``subset`` (classes kept) come from ``DecodedItems``.
    PER_ITEM_LISTS = ("images", "groups", "given_splits", "ids")
    PER_ITEM_ARRAYS = ("labels", "hashes", "fine_hashes")


def _check_paths_exist(items: list[SourceItem], root: Path) -> None:
    missing = sorted({str(it.path) for it in items if not it.path.exists()})
    if missing:
        examples = ", ".join(str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p for p in missing[:3])
        raise FileNotFoundError(
            f"{len(missing)} of {len(items)} image paths listed for {root} do not exist (e.g. {examples}): "
            f"fix or remove those rows of labels.csv (paths are relative to its folder) or those broken links"
        )


def _check_classes(labels: list[str], classes: Sequence[str] | None) -> tuple[str, ...]:
    counts = Counter(labels)
    if classes is not None:
        unknown = sorted(set(counts) - set(classes))
        if unknown:
            hint = did_you_mean(unknown[0], classes)
            raise ValueError(
                f"labels {unknown} are not among the expected classes {list(classes)}{hint}: fix the "
                f"labels, map them with label_map, or add the classes"
            )
        empty = sorted(set(classes) - set(counts))
        if empty:
            raise ValueError(f"declared classes {empty} have no image: remove them from classes or add images")
    single = sorted(c for c, n in counts.items() if n < 2)
    if single:
        raise ValueError(
            f"class(es) {single} have a single image: a class needs images in both the training and the "
            f"test split; add images or remove the class"
        )
    if len(counts) < 2:
        raise ValueError(f"a classification target needs at least 2 classes, found {sorted(counts)}")
    if classes is None:
        _warn_near_duplicate_labels(counts)
    return tuple(sorted(classes if classes is not None else counts))


def _warn_near_duplicate_labels(counts: Counter[str]) -> None:
    """Warn about labels that differ only in case ("yes" and "Yes"): they are distinct classes, which
    is rarely meant (found by the hostile-user probe: a labels.csv typed by hand trained a 3-class
    model without a word). Not an error: a source may mean them apart."""
    groups: dict[str, list[str]] = {}
    for label in sorted(counts):
        groups.setdefault(label.casefold(), []).append(label)
    alike = [g for g in groups.values() if len(g) > 1]
    if alike:
        shown = "; ".join(" / ".join(f"'{c}' ({counts[c]})" for c in g) for g in alike)
        warnings.warn(f"labels that differ only in case are separate classes: {shown}; if they are one class, "
                      f"fix labels.csv or map them with label_map", stacklevel=4)


def _item_id(item: SourceItem, frame: int, n_frames: int, root: Path) -> str:
    base = str(item.path.relative_to(root)) if item.path.is_relative_to(root) else str(item.path)
    if isinstance(item.frame, tuple):
        return f"{base}#{item.frame[0]}/{item.frame[1]}"
    return f"{base}#{frame}" if n_frames > 1 else base


def load_target(
    data: str | Path,
    *,
    format: str = "auto",
    csv_file: str | Path | None = None,
    columns: Mapping[str, str] | None = None,
    label_map: Mapping[str, str] | None = None,
    classes: Sequence[str] | None = None,
    max_side: int | None = 256,
) -> TargetSet:
    """Enumerate, check and decode a labelled target.

    Args:
        data: a folder (``labels.csv`` with ``path,label,split,group``, or one sub-folder per class),
            a MedMNIST-style ``.npz``, or the folder of another CSV (with ``csv_file`` and
            ``columns``); see ``openmednet.data.sources``.
        format: a ``SourceSpec`` format, ``"auto"`` to detect.
        csv_file: the CSV for ``format="csv"`` (relative to ``data`` or absolute).
        columns: for ``format="csv"``: ``{"path": ..., "label": ..., "split": ..., "group": ...}``
            mapping our names to the CSV's columns.
        label_map: renaming of raw labels (``{"0": "normal", "1": "pneumonia"}``).
        classes: expected class names; other labels are an error, and so is a class without images.
            Class indices follow the sorted names (the last one is the positive class of a binary ROC).
        max_side: shorter-side cap of the stored images (``None`` keeps the originals).

    Returns:
        The decoded ``TargetSet``.

    Raises:
        FileNotFoundError: ``data`` or listed image files do not exist.
        ValueError: no labelled image, unknown labels, a single-image class, fewer than 2 classes, or
            a segmentation folder (``masks.csv``) read with ``format="auto"``.
    """
    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(f"target data not found: {root} (expected a folder, labels.csv folder or .npz)")
    if format == "auto" and (root / MASKS_CSV).is_file() and not (root / "labels.csv").is_file():
        # Read as class folders, its images/ and masks/ became two classes and a run "succeeded".
        raise ValueError(f"{root} is a segmentation folder ({MASKS_CSV}): use --task segmentation (task: "
                         f"segmentation in a study), or add labels.csv to classify its images")
    spec = SourceSpec(
        name=root.stem, root=root, format=format, csv_file=Path(csv_file) if csv_file else None,
        columns=dict(columns or {}), label_map=dict(label_map or {}),
    )
    items = list(iter_source(spec))
    labelled = [it for it in items if it.label]
    if len(labelled) < len(items):
        logger.info("%s: %d of %d items have no label and are left out", root, len(items) - len(labelled), len(items))
    skipped: Counter[str] = Counter()
    real = functools.cache(os.path.realpath)  # cached: the rows of an .npz all name one file
    labelled = drop_repeated_rows(labelled, lambda it: (real(it.path), it.frame, it.label, it.split, it.group), skipped)
    if not labelled:
        raise ValueError(
            f"no labelled images in {root}: give labels in labels.csv (path,label,split,group), one "
            f"sub-folder per class, or a labelled .npz"
        )
    _check_paths_exist(labelled, root.parent if root.is_file() else root)
    label_names = _check_classes([it.label for it in labelled], classes)

    images, labels, groups, splits, ids = [], [], [], [], []
    for item in labelled:
        decoded = list(read_item(item, on_skip=lambda s: skipped.update([s.reason])))
        for arr, meta in decoded:
            images.append(arr)
            labels.append(item.label)
            # Images of one multi-image file (DICOM frames, volume slices) share a patient.
            groups.append(item.group or (str(item.path) if len(decoded) > 1 else None))
            splits.append(item.split)
            ids.append(_item_id(item, meta.frame, len(decoded), root.parent if root.is_file() else root))
    if skipped:
        warnings.warn(f"{root}: skipped {sum(skipped.values())} images {dict(skipped)}", stacklevel=2)
    if not images:
        raise ValueError(f"no image of {root} could be decoded ({dict(skipped)})")

    channels = _majority_channels(images, root)
    # Store gray content as (H, W) and colour as (H, W, 3); the transform adapts to the model.
    # np.require: writable, contiguous arrays (Pillow's are read-only; torch.from_numpy wants writable).
    images = [np.require(shrink(to_channels(a, channels)[0], max_side), requirements=["C", "W"]) for a in images]
    hashes, fine_hashes = phashes(images)
    target = TargetSet(
        images=images, labels=np.asarray(labels, dtype=object), groups=groups, given_splits=splits, ids=ids,
        label_names=label_names, channels=channels, hashes=hashes, fine_hashes=fine_hashes, root=root, skipped=dict(skipped),
    )
    _check_classes(list(target.labels), label_names)  # undecodable files may have emptied a class
    logger.info("%s: %d images, %d classes %s, %d channel(s)", root, len(target), len(label_names),
                dict(Counter(target.labels.tolist())), channels)
    return target

