"""Datasets: the pre-training corpus (``CorpusDataset``) and small labelled targets (``LabelledDataset``).

Both yield uint8 ``(C, S, S)`` tensors through a transform from ``openmednet.data.transforms`` and
expose their per-image integer arrays (``.labels``, and ``.sources`` for the corpus) so samplers
can balance without touching pixels.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from openmednet._errors import did_you_mean, look_up_option
from openmednet.data.images import resize_to_square, to_channels
from openmednet.data.readers import SkipImage
from openmednet.data.shards import SPLITS, UNLABELLED, CorpusArrays
from openmednet.data.sources import SourceItem, read_item

__all__ = ["CorpusDataset", "LabelledDataset", "apply_batch_transform", "apply_transform"]


Transform = Callable[[Tensor], Any]
#: A dataset key: an index, or ``(index, augmentation seed)`` as the samplers yield with ``seeded=True``.
Key = int | tuple[int, int]


def _split_key(key: Key) -> tuple[int, int | None]:
    if isinstance(key, tuple):
        index, seed = key
        return int(index), int(seed)
    return int(key), None


def apply_transform(transform: Transform | None, image: Tensor, seed: int | None) -> Any:
    """``transform(image)``, with its random draws seeded by ``seed`` when given.

    Only torch's CPU generator is seeded (the transforms draw from it; CUDA generators, which drive
    dropout on GPUs, are untouched) and its state is restored afterwards, so the caller's random
    stream is the same as if the transform had not run.
    """
    if transform is None:
        return image
    if seed is None:
        return transform(image)
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(image)
    finally:
        generator.set_state(state)


def apply_batch_transform(transform: Any, images: Tensor, seeds: list[int | None]) -> list[Any]:
    """``transform.batch(images, seeds)`` split back into one output per image.

    Args:
        transform: a transform with ``supports_batch`` (``BatchAugment``, ``MultiViewTransform``).
        images: ``(B, C, H, W)`` uint8.
        seeds: one per image; all ``None`` draws from torch's global generator instead.

    Returns:
        ``B`` outputs: tensors, or lists of views for a multi-view transform.
    """
    out = transform.batch(images, None if any(s is None for s in seeds) else seeds)
    if isinstance(out, list):  # views: list over views of (B, ...) -> list over images of views
        return [[view[j] for view in out] for j in range(len(images))]
    return list(out.unbind(0))


def _batched(transform: Any) -> bool:
    return bool(getattr(transform, "supports_batch", False))


class CorpusDataset(Dataset):
    """Images of a built corpus (``openmednet corpus build``), optionally filtered.

    Args:
        root: corpus directory (holds ``manifest.json``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` (every image, including those without
            a split).
        transform: applied to each uint8 ``(C, S, S)`` tensor (e.g. ``build_transform(...)``);
            ``None`` returns the uint8 tensor.
        labelled_only: keep only images with a label (supervised objectives).
        sources: keep only these source names (``manifest.sources[i]["name"]``).

    Attributes:
        arrays: the underlying ``CorpusArrays``.
        indices: ``(N,)`` corpus indices of the kept images.
        labels: ``(N,)`` int64 label index into ``label_names``, ``-1`` = unlabelled.
        sources: ``(N,)`` int64 source index into ``source_names``.
        label_names, source_names: the corpus' tables.

    Items are ``(image, label, source)``: ``image`` what the transform returns (a float
    ``(C, H, W)`` tensor, or a list of views for a multi-view transform), ``label`` and ``source``
    Python ints. Keys are indices or ``(index, seed)`` pairs (seeded augmentation, see
    :func:`apply_transform`).

    Raises:
        FileNotFoundError: no corpus at ``root``.
        KeyError: unknown split or source name (the message lists the valid ones).
        ValueError: the filters leave no image.
    """

    #: ``build_loader`` may pass ``(index, seed)`` keys.
    supports_seeded_keys = True

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        transform: Transform | None = None,
        *,
        labelled_only: bool = False,
        sources: Sequence[str] | None = None,
    ):
        self.arrays = CorpusArrays(root)
        self.transform = transform
        self.label_names = list(self.arrays.manifest.label_names)
        self.source_names = [s["name"] for s in self.arrays.manifest.sources]
        keep = np.ones(len(self.arrays), dtype=bool)
        if split is not None:
            keep &= self.arrays.split == SPLITS.index(look_up_option(split, SPLITS, "split"))
        if labelled_only:
            keep &= self.arrays.label != UNLABELLED
        if sources is not None:
            wanted = [self.source_names.index(look_up_option(s, self.source_names, "corpus source")) for s in sources]
            keep &= np.isin(self.arrays.source, wanted)
        self.indices = np.flatnonzero(keep).astype(np.int64)
        if len(self.indices) == 0:
            raise ValueError(
                f"no image of corpus {root} matches split={split!r}, labelled_only={labelled_only}, "
                f"sources={sources!r} (corpus has {len(self.arrays)} images; see manifest.json stats)"
            )
        self.labels = self.arrays.label[self.indices].astype(np.int64)
        self.sources = self.arrays.source[self.indices].astype(np.int64)

    @property
    def channels(self) -> int:
        """Channels of the stored images (1 or 3)."""
        return self.arrays.manifest.channels

    @property
    def image_size(self) -> int:
        """Side of the stored images."""
        return self.arrays.manifest.image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Key) -> tuple[Any, int, int]:
        i, seed = _split_key(key)
        image = torch.from_numpy(self.arrays.image(int(self.indices[i])))
        return apply_transform(self.transform, image, seed), int(self.labels[i]), int(self.sources[i])

    def __getitems__(self, keys: list[Key]) -> list[tuple[Any, int, int]]:
        """A batch of items (the DataLoader calls this): batched transforms run once per batch."""
        if not _batched(self.transform):
            return [self[k] for k in keys]
        index, seeds = zip(*map(_split_key, keys))
        images = torch.from_numpy(np.stack([self.arrays.image(int(self.indices[i])) for i in index]))
        outputs = apply_batch_transform(self.transform, images, list(seeds))
        return [(o, int(self.labels[i]), int(self.sources[i])) for o, i in zip(outputs, index)]


def _origin(item: SourceItem, frame: int) -> str:
    """``path`` for a single image, ``path#frame`` for a frame, ``path#split/row`` for an npz row."""
    if isinstance(item.frame, tuple):
        return f"{item.path}#{item.frame[0]}/{item.frame[1]}"
    return str(item.path) if item.frame is None and frame == 0 else f"{item.path}#{frame}"


class LabelledDataset(Dataset):
    """A small labelled target (fine-tuning, evaluation), decoded once and cached in RAM.

    Every image is read (``read_item`` for ``SourceItem``), converted to ``channels``, resized to
    ``image_size`` square and kept as uint8: targets are small (hundreds to a few thousand images;
    2,750 RGB images at 224 px take 414 MB, at 64 px 34 MB), and decoding once makes epochs cost
    only the augmentation.

    Args:
        items: ``SourceItem`` (from ``iter_source``) or ``(array, label)`` pairs with ``array``
            ``(H, W)`` or ``(H, W, 3)`` uint8. An item that holds several images (a multi-frame
            file with ``frame=None``) gives one sample per image, all with its label.
        channels: the model's input channels (1 or 3); other images are converted (gray ->
            repeated, RGB -> BT.601 luma) with one warning per dataset.
        image_size: side of the cached square images.
        transform: applied to each uint8 ``(C, S, S)`` tensor; ``None`` returns it.
        class_names: label order (index = position); default: the sorted distinct labels. Labels
            are compared as given (strings for ``SourceItem``).
        resize_mode: ``"pad"`` (keep the whole image, black borders) or ``"crop"`` (centre square);
            see ``openmednet.data.images.resize_to_square``.
        on_skip: ``"warn"`` (skip unreadable images, one warning with counts per reason) or
            ``"raise"``.

    Attributes:
        images: ``(N, C, S, S)`` uint8.
        labels: ``(N,)`` int64 indices into ``class_names``.
        class_names: list of labels.
        origins: ``(N,)`` provenance strings: ``path``, ``path#frame``, ``path#split/row`` (npz),
            ``"array[i]"`` for pairs.
        skipped: ``(origin, reason)`` of every skipped image.

    Items are ``(image, label index)``; keys are indices or ``(index, seed)`` pairs as for
    :class:`CorpusDataset`.

    Raises:
        ValueError: an item has no label, a label is not in ``class_names``, bad ``channels`` or
            ``resize_mode``, or nothing could be read.
    """

    #: ``build_loader`` may pass ``(index, seed)`` keys.
    supports_seeded_keys = True

    def __init__(
        self,
        items: Sequence[SourceItem] | Sequence[tuple[np.ndarray, Any]],
        *,
        channels: int,
        image_size: int,
        transform: Transform | None = None,
        class_names: Sequence[Any] | None = None,
        resize_mode: str = "pad",
        on_skip: str = "warn",
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        look_up_option(resize_mode, ("pad", "crop"), "resize_mode")
        look_up_option(on_skip, ("warn", "raise"), "on_skip")
        self.channels, self.image_size, self.transform = channels, image_size, transform
        self.skipped: list[tuple[str, str]] = []
        raw_labels, origins, images = [], [], []
        converted = 0
        for image, label, origin in self._decode(items, on_skip):
            image, changed = to_channels(image, channels)
            converted += changed
            image = resize_to_square(image, image_size, mode=resize_mode)
            images.append(image[None] if image.ndim == 2 else image.transpose(2, 0, 1))
            raw_labels.append(label)
            origins.append(origin)
        if not images:
            reasons = dict(Counter(r for _, r in self.skipped))
            raise ValueError(f"no readable image among {len(items)} items (skipped by reason: {reasons})")
        self._warn_summary(converted, len(images))
        self.class_names = list(class_names) if class_names is not None else sorted(set(raw_labels))
        self.labels = self._label_indices(raw_labels)
        self.images = np.ascontiguousarray(np.stack(images))
        self.origins = origins

    def _decode(self, items: Sequence[Any], on_skip: str):
        """Yield ``(array, label, origin)`` for every readable image of ``items``."""
        for i, item in enumerate(items):
            if isinstance(item, SourceItem):
                if item.label is None:
                    raise ValueError(f"item {item.path} (frame {item.frame}) has no label: keep only labelled items")
                try:
                    for array, meta in read_item(item):
                        yield array, item.label, _origin(item, meta.frame)
                except SkipImage as skip:
                    if on_skip == "raise":
                        raise
                    self.skipped.append((str(item.path), skip.reason))
            else:
                array, label = item
                if label is None:
                    raise ValueError(f"pair {i} has no label (None)")
                yield np.asarray(array), label, f"array[{i}]"

    def _warn_summary(self, converted: int, kept: int) -> None:
        # One warning each, not one per image: a target converted wholesale is one fact.
        if converted:
            warnings.warn(
                f"converted {converted} of {kept} images to {self.channels} channel(s) for the model "
                f"({'gray repeated to RGB' if self.channels == 3 else 'RGB to BT.601 luma'})",
                stacklevel=3,
            )
        if self.skipped:
            reasons = dict(Counter(r for _, r in self.skipped))
            warnings.warn(f"skipped {len(self.skipped)} unreadable images: {reasons}", stacklevel=3)

    def _label_indices(self, raw_labels: list[Any]) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = sorted({str(lab) for lab in raw_labels if lab not in index})
        if unknown:
            raise ValueError(
                f"labels {unknown} are not in class_names {self.class_names}"
                f"{did_you_mean(unknown[0], map(str, self.class_names))}: add them or filter those items"
            )
        return np.array([index[lab] for lab in raw_labels], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Key) -> tuple[Any, int]:
        i, seed = _split_key(key)
        return apply_transform(self.transform, torch.from_numpy(self.images[i]), seed), int(self.labels[i])

    def __getitems__(self, keys: list[Key]) -> list[tuple[Any, int]]:
        """A batch of items (the DataLoader calls this): batched transforms run once per batch."""
        if not _batched(self.transform):
            return [self[k] for k in keys]
        index, seeds = zip(*map(_split_key, keys))
        images = torch.from_numpy(self.images[list(index)])
        outputs = apply_batch_transform(self.transform, images, list(seeds))
        return [(o, int(self.labels[i])) for o, i in zip(outputs, index)]
