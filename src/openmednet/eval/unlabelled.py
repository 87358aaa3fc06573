"""Unlabelled images for semi-supervised fine-tuning: read, hashed, and checked against the test split.

Where they come from (``FinetuneConfig.unlabelled``):

- folders or files any reader accepts (flat folders, class folders, ``labels.csv``, ``.npz``,
  DICOM and NIfTI trees; see ``openmednet.data.sources``), several allowed. Labels they may carry are
  ignored (hidden) and counted; a segmentation folder (``masks.csv``) gives its images, not its masks;
- ``rest_of_train``: the target's training images outside the label budget (``per_class`` or
  ``label_fraction``), labels hidden: the standard protocol of semi-supervised benchmarks
  (FixMatch, Sohn et al. 2020, sec. 4.1), and already cleaned by ``prepare_splits``.

Leakage: an unlabelled image that is a near-copy of a test image is dropped by the rule that drops
training images (``find_near_duplicates`` on the 64-bit pHash within ``near_threshold`` bits,
confirmed by the 256-bit pHash; ``leakage="error"`` refuses instead), and listed in
``metrics.json`` (``semi.unlabelled.dropped.near_copies_of_test``). A test image seen without its
label still shapes the model (pseudo labels, consistency), so the test score would be inflated.
Images from folders are checked against the validation split too (``near_copies_of_val``): a
folder may be the target itself, and validation images trained on without labels would bias the
model choice made on them.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from openmednet.data.dedupe import phashes
from openmednet.data.images import shrink, to_channels
from openmednet.data.segmentation import MASKS_CSV, read_masks_csv
from openmednet.data.sources import SourceItem, SourceSpec, iter_source, read_item
from openmednet.eval.splits import find_near_duplicates
from openmednet.eval.targets import TargetSet

__all__ = ["REST_OF_TRAIN", "UnlabelledSet", "check_unlabelled", "drop_held_out_near_copies", "load_unlabelled", "rest_of_train"]

logger = logging.getLogger(__name__)

#: ``unlabelled`` value meaning "the training images outside the label budget, labels hidden".
REST_OF_TRAIN = "rest_of_train"


@dataclass
class UnlabelledSet:
    """Decoded unlabelled images.

    Attributes:
        images: ``N`` uint8 arrays, ``(H, W)`` or ``(H, W, 3)`` (the target's channels).
        ids: ``N`` stable ids (``<source>/<relative path>[#frame]``, or the target's id).
        hashes: ``(N,)`` uint64 64-bit pHashes; ``fine_hashes``: ``(N, 4)`` uint64 256-bit pHashes.
        sources: where they came from (folders, or ``rest_of_train``).
        skipped: undecodable files per reason.
        labels_hidden: images whose source carried a label, ignored here.
    """

    images: list[np.ndarray]
    ids: list[str]
    hashes: np.ndarray
    fine_hashes: np.ndarray
    sources: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    labels_hidden: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, keep: np.ndarray) -> UnlabelledSet:
        """The items at indices ``keep``."""
        keep = np.asarray(keep, dtype=np.int64)
        return UnlabelledSet([self.images[i] for i in keep], [self.ids[i] for i in keep], self.hashes[keep],
                             self.fine_hashes[keep], self.sources, dict(self.skipped), self.labels_hidden)


def _check_readable(root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(f"unlabelled images: {root} does not exist (give a folder, .npz or labels.csv folder, "
                                f"or '{REST_OF_TRAIN}')")
    if root.is_dir() and not os.access(root, os.R_OK | os.X_OK):
        raise ValueError(f"unlabelled images: cannot read folder {root} (permission denied): fix its permissions")


def _list_items(root: Path) -> list[SourceItem]:
    """The items of one source, nothing decoded; a missing, unreadable or empty source is a clear error.

    A segmentation folder (``masks.csv``) gives its images, each once: read as a plain folder, its
    ``images/`` and ``masks/`` sub-folders looked like two classes, and the masks were used as
    unlabelled images.
    """
    _check_readable(root)
    if root.is_file() and root.suffix.lower() != ".npz":
        raise ValueError(f"unlabelled images: {root} is a file; give a folder of images (flat, class folders or "
                         f"labels.csv), a segmentation folder or a .npz")
    if root.is_dir() and (root / MASKS_CSV).is_file():
        paths = dict.fromkeys(row["path"] for row in read_masks_csv(root))  # an image with two masks: once
        # root=root: read_item skips a row leading out of the folder, as load_segmentation does.
        return [SourceItem(path=root / p, source=root.stem, root=root) for p in paths]
    try:
        return list(iter_source(SourceSpec(name=root.stem, root=root)))
    except PermissionError as e:
        raise ValueError(f"unlabelled images: cannot read {root} ({e}): fix its permissions") from None
    except ValueError as e:
        raise ValueError(f"no unlabelled images found in {root}: {e}") from None


def _nothing_decoded(root: Path, skipped: Counter) -> ValueError:
    """The error of a source none of whose files decoded (``skipped``: its files per skip reason)."""
    return ValueError(f"no unlabelled images found in {root}: {skipped.total()} file(s) could not "
                      f"be decoded (by reason: {dict(skipped)}); give a folder of readable images")


def check_unlabelled(sources: Sequence[str | Path]) -> None:
    """Fail now on a source that ``load_unlabelled`` would refuse later: missing, unreadable, or
    without a decodable image (``rest_of_train`` is not checked: it depends on the split and budget).

    Cheap, for a study to check its folders once before any arm runs (each semi arm failed on
    its own otherwise): each source is listed (no pixels) and decoded only up to its first image.

    Raises:
        FileNotFoundError, ValueError: ``load_unlabelled``'s errors.
    """
    for source in sources:
        if str(source) != REST_OF_TRAIN:
            _check_decodable(Path(source))


def _check_decodable(root: Path) -> None:
    """Return at the first image of ``root`` that decodes; raise ``load_unlabelled``'s errors when none does."""
    skipped: Counter[str] = Counter()
    for item in _list_items(root):
        try:
            if next(read_item(item, on_skip=lambda s: skipped.update([s.reason])), None) is not None:
                return
        except PermissionError:
            skipped.update(["permission_denied"])
    raise _nothing_decoded(root, skipped)


def _read_source(root: Path, channels: int, max_side: int | None, skipped: Counter,
                 seen: set[tuple[str, str]]) -> tuple[list, list[str], int]:
    """Decode every image of one source not in ``seen`` (items of earlier sources, added to):
    ``(images, ids, labelled count)``."""
    items = _list_items(root)
    base = root.parent if root.is_file() else root
    images, ids, labelled = [], [], 0
    for item in items:
        # The same file reached twice (a folder given twice, or a folder and its sub-folder) would
        # be seen twice per epoch and counted twice in metrics.json.
        key = (str(item.path.resolve()), repr(item.frame))
        if key in seen:
            skipped.update(["listed_twice"])
            continue
        seen.add(key)
        labelled += item.label is not None
        try:
            decoded = list(read_item(item, on_skip=lambda s: skipped.update([s.reason])))
        except PermissionError:
            skipped.update(["permission_denied"])
            continue
        for array, meta in decoded:
            images.append(np.require(shrink(to_channels(array, channels)[0], max_side), requirements=["C", "W"]))
            rel = item.path.relative_to(base) if item.path.is_relative_to(base) else item.path
            ids.append(f"{root.name}/{rel}" + (f"#{meta.frame}" if len(decoded) > 1 else ""))
    return images, ids, labelled


def load_unlabelled(sources: Sequence[str | Path], *, channels: int, max_side: int | None = 256) -> UnlabelledSet:
    """Read unlabelled images from folders or files, converted to the target's ``channels``.

    Images are stored as ``load_target`` stores a target's (shorter side at most ``max_side``) and
    hashed the same way, so the near-copy check compares like with like. A file reached through
    several sources (a folder given twice, a folder and its sub-folder, a link) is used once (warned).

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: a folder that cannot be read, or no decodable image in a source (the message
            gives the counts of skipped files per reason).
    """
    if not sources:
        raise ValueError(f"no unlabelled source given: pass --unlabelled DIR (several allowed) or '{REST_OF_TRAIN}'")
    images, ids, labelled, skipped, seen = [], [], 0, Counter(), set()
    for source in sources:
        root = Path(source)
        before = Counter(skipped)
        got, got_ids, n_labelled = _read_source(root, channels, max_side, skipped, seen)
        here = skipped - before
        if not got and set(here) != {"listed_twice"}:  # a source wholly inside an earlier one is only redundant
            raise _nothing_decoded(root, here)
        images += got
        ids += got_ids
        labelled += n_labelled
    twice = skipped.pop("listed_twice", 0)
    if twice:
        warnings.warn(f"unlabelled images: {twice} files listed by more than one source are used once", stacklevel=2)
    if skipped:
        warnings.warn(f"unlabelled images: skipped {sum(skipped.values())} undecodable files {dict(skipped)}", stacklevel=2)
    if labelled:
        logger.info("unlabelled images: %d items carried labels; the labels are hidden (not used)", labelled)
    hashes, fine_hashes = phashes(images)
    return UnlabelledSet(images=images, ids=ids, hashes=hashes,
                         fine_hashes=fine_hashes, sources=[str(s) for s in sources],
                         skipped=dict(skipped), labels_hidden=labelled)


def rest_of_train(target: TargetSet, splits: np.ndarray, used: np.ndarray) -> UnlabelledSet:
    """The training images outside the label budget ``used``, labels hidden.

    Raises:
        ValueError: no such image (no budget was given, so every training image is labelled).
    """
    rest = np.setdiff1d(np.flatnonzero(splits == "train"), used)
    if not rest.size:
        raise ValueError(f"no unlabelled images found: '{REST_OF_TRAIN}' is empty because every training image is "
                         f"already labelled; give a label budget (per_class or label_fraction) or --unlabelled DIR")
    return UnlabelledSet(images=[target.images[i] for i in rest], ids=[target.ids[i] for i in rest],
                         hashes=target.hashes[rest], fine_hashes=target.fine_hashes[rest], sources=[REST_OF_TRAIN],
                         labels_hidden=int(rest.size))


def drop_held_out_near_copies(unlabelled: UnlabelledSet, target: TargetSet, splits: np.ndarray, *,
                              near_threshold: int, leakage: str, held_out: Sequence[str] = ("test",)
                              ) -> tuple[UnlabelledSet, dict[str, list[str]]]:
    """Drop unlabelled images that are near-copies of held-out images (the training images' rule).

    ``held_out`` names the splits checked: ``("test",)`` for ``rest_of_train`` (training images,
    already cleaned by ``prepare_splits`` as every training image is), ``("val", "test")`` for
    folders, which may hold the target's own validation images: a model that trained on them,
    even without their labels, scores them too well, and model choice on that score is biased.

    Returns:
        The kept images, and per held-out split (``near_copies_of_test``, ``near_copies_of_val``)
        the ids of the dropped ones.

    Raises:
        ValueError: near-copies found and ``leakage == "error"``, or none left.
    """
    dropped: dict[str, list[str]] = {}
    copies: set[int] = set()
    for split in held_out:
        rows = np.flatnonzero(splits == split)
        pairs = find_near_duplicates(target.hashes[rows], unlabelled.hashes, near_threshold,
                                     query_fine=target.fine_hashes[rows], reference_fine=unlabelled.fine_hashes)
        found = sorted({j for _, j, _ in pairs} - copies)
        dropped[f"near_copies_of_{split}"] = [unlabelled.ids[j] for j in found]
        if not found:
            continue
        copies.update(found)
        name = "test" if split == "test" else "validation"
        examples = [f"{target.ids[rows[i]]} ~ {unlabelled.ids[j]} ({d} bits)" for i, j, d in pairs[:3]]
        harm = "the test score would be inflated" if split == "test" else "model choice on the validation score would be biased"
        if leakage == "error":
            raise ValueError(f"{len(found)} unlabelled images are near-copies of {name} images (e.g. {examples}): "
                             f"{harm}. Remove them from the unlabelled folders, or set leakage='drop'")
        warnings.warn(f"left out {len(found)} unlabelled images that are near-copies of {name} images (within "
                      f"{near_threshold} of 64 pHash bits, confirmed by the 256-bit hash; {harm}), e.g. {examples}",
                      stacklevel=2)
    if copies and len(copies) == len(unlabelled):
        raise ValueError(f"no unlabelled images left: all {len(copies)} are near-copies of "
                         f"{' or '.join('validation' if s == 'val' else s for s in held_out)} images")
    if not copies:
        return unlabelled, dropped
    return unlabelled.subset(np.setdiff1d(np.arange(len(unlabelled)), sorted(copies))), dropped
