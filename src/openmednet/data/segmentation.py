"""Segmentation targets: image + mask pairs read once into memory, joint augmentation, a dataset.

A segmentation folder (``../shared/data/seg/*/*``) holds::

    masks.csv     path,mask,split,group   (paths relative to the folder; split/group may be empty;
                  a row that resolves outside the folder is skipped as "outside_root", and one that
                  repeats an earlier row as "duplicate_row", as in labels.csv)
    classes.txt   "index name" per line, 0 = background
    images/       any format the readers decode (JPEG, PNG, DICOM...)
    masks/        single-channel PNGs (mode L or P), pixel value = class index, same size as the image

``load_segmentation`` decodes every pair (image through ``openmednet.data.readers``, the same
decoding as classification; mask through Pillow, values kept exactly) into a ``SegmentationSet``.
That object has the attributes the fine-tuning splits and leakage checks read from a
classification ``TargetSet`` (``labels``, ``label_names``, ``groups``, ``given_splits``, ``ids``,
``hashes``, ``fine_hashes``, ``channels``, ``subset``), so the segmentation task runs through the
same ``prepare_splits`` (group-aware stratified splits, near-copy checks), pre-training leakage
check and few-shot subsampling as classification (``openmednet.eval.segmentation``); both are
``openmednet.data.decoded.DecodedItems`` (``subset``, ``y``), and the tests pin the match.

Its ``labels`` are not classes but **strata** (``mask_strata``): ``"empty"`` for an image
without foreground, else ``"<class>:small"`` / ``"<class>:large"`` by the largest foreground
class's share of the image (split at that class's median). Splits stratified by them keep the
share of empty slices and the lesion sizes alike in train, validation and test (Dice depends
strongly on object size), and a few-shot budget ``per_class=N`` takes N images per stratum.

Augmentation (``build_joint_transform``) uses torchvision.transforms.v2 with ``tv_tensors.Image``
and ``tv_tensors.Mask``: every geometric operation moves image and mask together, the mask with
nearest-neighbour interpolation (class indices are never blended), photometric ones touch the
image only. Evaluation inputs come from ``engine.inputs.EvalInputs`` (``eval.segmentation``).
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
import torch
from torch import Tensor
from torch.utils.data import Dataset

from openmednet.data.decoded import GRAY_TOLERANCE, DecodedItems, majority_channels
from openmednet.data.dedupe import phashes
from openmednet.data.images import shrink, to_channels

__all__ = [
    "MASKS_CSV",
    "SegmentationDataset",
    "SegmentationSet",
    "build_joint_transform",
    "collate_eval",
    "load_segmentation",
    "mask_strata",
    "read_classes",
    "read_mask",
]

logger = logging.getLogger(__name__)

MASKS_CSV = "masks.csv"
#: Largest share of differing pixels at which two masks of one image count as the same annotation
#: (``SegmentationSet.same_annotation``); above it the image carries two labels and is dropped.
MASK_AGREEMENT = 0.01
CLASSES_TXT = "classes.txt"
EMPTY = "empty"


# ------------------------------------------------------------------------------------ reading
def read_classes(path: str | Path) -> tuple[str, ...]:
    """Class names by mask value from ``classes.txt`` (``"index name"`` per line, 0 = background;
    index and name separated by spaces or a tab).

    Raises:
        FileNotFoundError: no such file.
        ValueError: indices that are not ``0..K-1`` in order, a missing name, or fewer than 2 classes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a segmentation folder needs classes.txt ('0 background' per line)")
    names = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        index, name = (line.split(None, 1) + [""])[:2]  # any whitespace: a tab-separated file is common
        if not index.isdigit() or int(index) != len(names) or not name.strip():
            raise ValueError(f"{path}:{n}: expected '{len(names)} <name>', got {line!r}")
        names.append(name.strip())
    if len(names) < 2:
        raise ValueError(f"{path}: a segmentation task needs background and at least one class, got {names}")
    return tuple(names)


def read_mask(path: str | Path, num_classes: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A class-index mask as uint8 ``(H, W)``, values exactly as stored.

    Accepts single-channel PNG/TIFF (Pillow modes ``L``, ``P``, ``1``, ``I;16*``, ``I``); palette
    masks keep their indices (not the palette colours).

    Args:
        path: the mask file.
        num_classes: values must lie in ``[0, num_classes)``.
        shape: the image's ``(H, W)``; when given, a mask of another size is refused from its
            header, before its pixels are decoded (so a mask cannot be larger than the image
            reader allowed its image to be: no decompression bomb).

    Raises:
        ValueError: a file Pillow cannot decode (empty, truncated, not an image, over Pillow's
            pixel limit), a colour mask, a size other than ``shape``, or values outside
            ``[0, num_classes)`` (negative ones included: a 32-bit mask's -1 "ignore" label).
    """

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "1", "I;16", "I;16L", "I;16B", "I"):
                raise ValueError(f"{path}: mask mode {im.mode} is not a class-index image; save masks as "
                                 f"single-channel PNGs whose pixel value is the class index")
            if shape is not None and (im.height, im.width) != tuple(shape):
                raise ValueError(f"{path}: mask {(im.height, im.width)} and image {tuple(shape)} differ in size; "
                                 f"masks must be drawn on the image as stored")
            mask = np.asarray(im)
    # Pillow's errors (UnidentifiedImageError and "image file is truncated" are OSErrors without a
    # file name, DecompressionBombError is neither) would end the run in a traceback.
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: the mask cannot be decoded ({e}); re-export it as a single-channel PNG") from e
    bad = np.unique(mask[(mask < 0) | (mask >= num_classes)]) if mask.size else []
    if len(bad):
        raise ValueError(f"{path}: mask values {bad[:5].tolist()} are not classes 0..{num_classes - 1} of "
                         f"classes.txt (a 0/255 mask? map 255 to 1 first)")
    return mask.astype(np.uint8)


def _upright_mask(path: Path, num_classes: int, shape: tuple[int, int], orientation: int) -> np.ndarray:
    """The mask of an image of ``shape`` that the reader turned upright by its EXIF ``orientation``.

    A mask holds no orientation of its own. Drawn on the stored pixels (the size they have before
    the turn), it is turned as the image was; drawn on the upright image (its size), it is kept.
    When both sizes agree (a square image, a flip) the two cannot be told apart and the pair is
    refused: kept as it was, such a mask silently labelled the wrong pixels.
    """
    if orientation == 1:
        return read_mask(path, num_classes, shape=shape)
    from PIL import ExifTags, Image, ImageOps

    stored = shape[::-1] if orientation >= 5 else shape  # EXIF 5-8 swap the sides
    if stored == shape:
        raise ValueError(f"{path}: its image carries EXIF orientation {orientation}, so readers show the image "
                         f"turned, and a {shape[0]}x{shape[1]} mask could be drawn either way; save the image "
                         f"without the orientation tag, in the orientation its mask was drawn on")
    try:
        with Image.open(path) as im:  # the header only
            drawn_on_stored = (im.height, im.width) == stored
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError):
        drawn_on_stored = False  # read_mask names the problem
    if not drawn_on_stored:
        return read_mask(path, num_classes, shape=shape)
    mask = Image.fromarray(read_mask(path, num_classes, shape=stored))
    mask.getexif()[ExifTags.Base.Orientation] = orientation  # turned as the image was
    return np.asarray(ImageOps.exif_transpose(mask))


def check_classes_present(masks: Sequence[np.ndarray], class_names: Sequence[str], root: Path) -> None:
    """Refuse a set where some foreground class of ``classes.txt`` has no pixel in any mask.

    Such a class cannot be learned or measured, yet it took a head channel and its Dice (0 once
    the model predicts a pixel of it) pulled the headline mean down; classification refuses a class
    without training images likewise. A set whose masks are all background has nothing to learn.

    Raises:
        ValueError: no foreground pixel at all, or a class absent from every mask.
    """
    counts = np.zeros(len(class_names), dtype=np.int64)
    for m in masks:
        counts += np.bincount(m.ravel(), minlength=len(class_names))[:len(class_names)]
    if not counts[1:].any():
        raise ValueError(f"no mask of {root} has a foreground pixel (all {len(masks)} are background, value 0): there "
                         f"is nothing to learn; check that mask values are the class indices of classes.txt")
    absent = [f"{k} {class_names[k]}" for k in range(1, len(class_names)) if not counts[k]]
    if absent:
        raise ValueError(f"{root}: classes.txt lists {absent}, which no mask contains: such a class can be neither "
                         f"learned nor measured. Remove it from classes.txt (masks keep their values, so renumber "
                         f"them if it is not the last), or add masks that contain it")


def mask_strata(masks: Sequence[np.ndarray], class_names: Sequence[str]) -> np.ndarray:
    """One stratum per mask: ``"empty"``, or ``"<class>:small"`` / ``"<class>:large"``.

    ``<class>`` is the foreground class covering most pixels; small/large splits that class's
    images at the median of its pixel share (ties go to ``small``), so the sizes are spread
    evenly over the splits. A class with a single image stays unsplit (``"<class>"``): a stratum
    of one image cannot be in both training and test.
    """
    fractions, dominant = [], []
    for m in masks:
        counts = np.bincount(m.ravel(), minlength=len(class_names))[1:]
        k = int(counts.argmax()) + 1
        dominant.append(k if counts.max() > 0 else 0)
        fractions.append(counts.max() / m.size)
    dominant, fractions = np.asarray(dominant), np.asarray(fractions)
    out = np.full(len(masks), EMPTY, dtype=object)
    for k in sorted(set(dominant.tolist()) - {0}):
        members = dominant == k
        if members.sum() < 2:
            out[members] = class_names[k]
            continue
        median = np.median(fractions[members])
        out[members] = np.where(fractions[members] > median, f"{class_names[k]}:large", f"{class_names[k]}:small")
    return out


@dataclass
class SegmentationSet(DecodedItems):
    """Decoded image + mask pairs of one segmentation target.

    Attributes:
        images: ``N`` uint8 arrays, ``(H, W)`` (gray content) or ``(H, W, 3)``.
        masks: ``N`` uint8 ``(H, W)`` class-index masks, each the size of its image.
        class_names: names by mask value (``classes.txt``), 0 = background.
        groups: ``N`` patient ids (``None`` when unknown).
        given_splits: ``N`` split names from ``masks.csv`` (``None`` when not given).
        ids: ``N`` image paths relative to the folder.
        channels: 1 if most images have gray content, else 3 (the minority is converted, warned).
        hashes, fine_hashes: ``(N,)`` 64-bit and ``(N, 4)`` 256-bit perceptual hashes of the images
            (``data.dedupe``), for the near-copy checks.
        root: the folder.
        skipped: count of skipped pairs per reason (``"duplicate_row"``, ``"outside_root"``, undecodable images).
        labels: ``(N,)`` strata (``mask_strata``), what splits are stratified by.
    """

    images: list[np.ndarray]
    masks: list[np.ndarray]
    class_names: tuple[str, ...]
    groups: list[str | None]
    given_splits: list[str | None]
    ids: list[str]
    channels: int
    hashes: np.ndarray
    fine_hashes: np.ndarray
    root: Path
    skipped: dict[str, int] = field(default_factory=dict)
    labels: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.labels is None:
            self.labels = mask_strata(self.masks, self.class_names)

    @property
    def label_names(self) -> tuple[str, ...]:
        """Sorted strata present (the ``TargetSet.label_names`` the split checks compare with)."""
        return tuple(sorted(set(self.labels.tolist())))

    def same_annotation(self, i: int, j: int) -> bool:
        """Whether pairs ``i`` and ``j`` (of identical images) carry the same mask.

        The masks agree when at most ``MASK_AGREEMENT`` of their pixels differ, ``j``'s mask
        resized to ``i``'s size (nearest) if the copies differ in size: copies of one image saved
        at two sizes disagree on a few boundary pixels. ``prepare_splits`` drops images whose
        masks disagree, as it drops identical images with two class labels.
        """
        a, b = self.masks[i], self.masks[j]
        if a.shape != b.shape:
            b = np.asarray(Image.fromarray(b).resize(a.shape[::-1], Image.Resampling.NEAREST))
        return float(np.mean(a != b)) <= MASK_AGREEMENT

    # ``y`` (stratum indices), ``len`` and ``subset`` (each item's stratum kept) come from ``DecodedItems``.
    PER_ITEM_LISTS = ("images", "masks", "groups", "given_splits", "ids")
    PER_ITEM_ARRAYS = ("hashes", "fine_hashes", "labels")


def read_masks_csv(root: Path) -> list[dict[str, str]]:
    """The rows of ``root/masks.csv``, checked: the columns ``path`` and ``mask``, at least one row,
    every listed file present (rows are not yet checked to stay inside ``root``: ``load_segmentation``).

    Raises:
        FileNotFoundError: no ``masks.csv``, or a listed file missing.
        ValueError: not UTF-8, a column missing, or no row.
    """
    manifest = root / MASKS_CSV
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: a segmentation folder needs masks.csv "
                                f"(path,mask,split,group) and classes.txt")
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which plain utf-8 kept in the
    # first column's name ("\ufeffpath"), so a valid manifest was refused for a missing 'path'.
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except UnicodeDecodeError as e:
        raise ValueError(f"{manifest} is not UTF-8 (cannot decode byte {e.object[e.start]:#04x}); re-save it as "
                         f"UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    missing_cols = {"path", "mask"} - set(header)
    if missing_cols:
        raise ValueError(f"{manifest}: columns {sorted(missing_cols)} missing (expected path,mask,split,group; "
                         f"it has {header})")
    if not rows:
        raise ValueError(f"{manifest} lists no image: add one path,mask row per image + mask pair")
    missing = [r[c] for r in rows for c in ("path", "mask") if not (root / r[c]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} files listed in {manifest} do not exist (e.g. {missing[:3]}): "
                                f"paths are relative to its folder")
    return rows


def _shrink_pair(image: np.ndarray, mask: np.ndarray, max_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Shorter side to at most ``max_side``: image bilinear, mask nearest (bounded memory)."""
    from PIL import Image

    # The mask has the image's size (checked on reading), so both get the same new size.
    return shrink(image, max_side), shrink(mask, max_side, Image.Resampling.NEAREST)


def load_segmentation(data: str | Path, *, max_side: int | None = 256) -> SegmentationSet:
    """Read and check every image + mask pair of a segmentation folder (see the module docstring).

    Args:
        data: the folder with ``masks.csv`` and ``classes.txt``.
        max_side: shorter-side cap of the stored pairs (``None`` keeps the originals).

    Raises:
        FileNotFoundError: the folder, its manifest or listed files are missing.
        ValueError: a mask whose size differs from its image, values outside the classes, colour
            or undecodable masks (``read_mask``), or no decodable pair.
    """
    from openmednet.data.readers import SkipImage, read_images
    from openmednet.data.sources import check_inside_root, drop_repeated_rows

    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation data not found: {root} (expected a folder with masks.csv)")
    rows = read_masks_csv(root)
    class_names = read_classes(root / CLASSES_TXT)
    skipped: Counter[str] = Counter()
    # A pair listed twice is used once, as a labels.csv row is (the files compared, not the text).
    rows = drop_repeated_rows(rows, lambda r: (os.path.realpath(root / r["path"]), os.path.realpath(root / r["mask"]),
                                               r.get("split") or None, r.get("group") or None), skipped)
    images, masks, groups, splits, ids = [], [], [], [], []
    for row in rows:
        try:
            # The labels.csv rule (data.sources): a manifest row, or a link, that leads out of the
            # folder is skipped, so a shared masks.csv cannot make a run read (and train on, and
            # write ids of) arbitrary files such as ../../etc or another study's test images.
            for column in ("path", "mask"):
                check_inside_root(root / row[column], root)
        except SkipImage as skip:
            skipped.update([skip.reason])
            continue
        decoded = list(read_images(root / row["path"], on_skip=lambda s: skipped.update([s.reason])))
        if not decoded:
            continue
        image, meta = decoded[0]
        mask = _upright_mask(root / row["mask"], len(class_names), image.shape[:2],
                             meta.extra.get("exif_orientation", 1))
        images.append(image)
        masks.append(mask)
        groups.append(row.get("group") or None)
        splits.append(row.get("split") or None)
        ids.append(row["path"])
    if skipped:
        warnings.warn(f"{root}: skipped {sum(skipped.values())} images {dict(skipped)}", stacklevel=2)
    if not images:
        raise ValueError(f"no image of {root} could be decoded ({dict(skipped)})")
    check_classes_present(masks, class_names, root)
    channels, _ = majority_channels(images, GRAY_TOLERANCE)  # the minority is converted below
    pairs = [_shrink_pair(to_channels(a, channels)[0], m, max_side) for a, m in zip(images, masks)]
    images = [np.require(a, requirements=["C", "W"]) for a, _ in pairs]
    masks = [np.require(m, requirements=["C", "W"]) for _, m in pairs]
    hashes, fine_hashes = phashes(images)
    out = SegmentationSet(
        images=images, masks=masks, class_names=class_names, groups=groups, given_splits=splits, ids=ids,
        channels=channels, hashes=hashes, fine_hashes=fine_hashes, root=root, skipped=dict(skipped),
    )
    logger.info("%s: %d pairs, classes %s, strata %s, %d channel(s)", root, len(out), class_names,
                dict(Counter(out.labels.tolist())), channels)
    return out


# ------------------------------------------------------------------------------------ transforms
def build_joint_transform(
    mean: Sequence[float],
    std: Sequence[float],
    size: int,
    *,
    hflip: bool = True,
    color: bool = False,
    crop_scale: tuple[float, float] = (0.5, 1.0),
) -> Callable[[Any], tuple[Tensor, Tensor]]:
    """Training image + mask pipeline (torchvision.transforms.v2) to ``(float32 (C, S, S), int64 (S, S))``.

    Input: ``(tv_tensors.Image uint8 (C, H, W), tv_tensors.Mask uint8 (H, W))``.

    ``RandomResizedCrop(S, crop_scale)`` and (``hflip``) horizontal flips move image and mask
    together (v2 resizes ``Mask`` with nearest-neighbour interpolation, so class values are kept
    exactly), then (``color``) brightness/contrast jitter on the image only, ``x / 255`` and
    ``(x - mean) / std``. Evaluation inputs are not made here but by the one evaluation pipeline
    (``openmednet.engine.inputs.EvalInputs``, see ``openmednet.eval.segmentation``), which the
    ``data`` layer cannot import.
    """
    from torchvision.transforms import v2

    ops: list[Any] = [v2.RandomResizedCrop((size, size), scale=crop_scale, antialias=True)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if color:
        ops.append(v2.ColorJitter(brightness=0.2, contrast=0.2))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    pipeline = v2.Compose(ops)

    def apply(pair: Any) -> tuple[Tensor, Tensor]:
        image, mask = pair
        image, mask = pipeline(image, mask)
        return image.as_subclass(Tensor), mask.as_subclass(Tensor).long()

    return apply


class SegmentationDataset(Dataset):
    """Image + mask pairs in RAM through a joint transform; keys may be ``(index, seed)``.

    Args:
        images: ``N`` uint8 ``(H, W)`` or ``(H, W, 3)`` arrays, already with the model's channels.
        masks: ``N`` uint8 ``(H, W)`` class-index masks.
        transform: ``build_joint_transform(...)`` or any callable on ``(tv_tensors.Image, tv_tensors.Mask)``.

    Items are ``(image float32 (C, S, S), mask int64)``; with ``build_loader`` each position's
    augmentation is seeded from ``(seed, epoch, position)``, as for ``LabelledDataset``.
    """

    #: ``build_loader`` may pass ``(index, seed)`` keys.
    supports_seeded_keys = True

    def __init__(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], transform: Callable[[Any], Any]):
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        from torchvision import tv_tensors

        self.images = [tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))))
                       for a in images]
        self.masks = [tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(m))) for m in masks]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        from openmednet.data.datasets import apply_transform

        i, seed = (key if isinstance(key, tuple) else (key, None))
        return apply_transform(self.transform, (self.images[int(i)], self.masks[int(i)]), seed)


def collate_eval(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
    """Stack the ``(C, S, S)`` inputs, keep the masks (stored resolutions differ) as a list."""
    return torch.stack([x for x, _ in batch]), [m for _, m in batch]
