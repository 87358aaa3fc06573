"""What every decoded in-memory target shares: item-wise subsets, class indices, the channel choice.

A classification ``TargetSet`` (``openmednet.eval.targets``) and a ``SegmentationSet``
(``openmednet.data.segmentation``) are dataclasses of ``N`` decoded items whose per-item fields
(images, labels, groups, ids, hashes...) are sliced together by ``subset``, and whose ``labels``
index into ``label_names`` (``y``). ``DecodedItems`` is that behaviour, written once; ``data``
cannot import ``eval``, so it lives here and ``eval.targets`` uses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar, Self

import numpy as np

from openmednet.data.images import is_gray_content

__all__ = ["GRAY_TOLERANCE", "DecodedItems", "majority_channels"]

# JPEG chroma noise makes "gray saved as RGB" differ by a level or two between channels.
GRAY_TOLERANCE = 3


def majority_channels(images: Sequence[np.ndarray], tol: int = GRAY_TOLERANCE) -> tuple[int, int]:
    """``(channels, minority)``: 1 if most images have gray content (ties count as gray), else 3,
    and how many images are of the other kind (they are converted to the majority's channels).

    A modality decides a target's channels, not its odd file: a brain MRI set with a few
    colour-annotated JPEGs (brain_mri_yes_no: 30 of 253) is gray, and those few become gray.
    """
    n_gray = sum(is_gray_content(a, tol=tol) for a in images)
    channels = 1 if 2 * n_gray >= len(images) else 3
    return channels, (len(images) - n_gray if channels == 1 else n_gray)


class DecodedItems:
    """Mixin for a dataclass of ``N`` decoded items with ``labels`` indexing ``label_names``.

    The dataclass names its per-item fields (length ``N``) in ``PER_ITEM_LISTS`` (a subset holds
    new lists of them) and ``PER_ITEM_ARRAYS`` (numpy arrays, indexed); every other field is the
    whole set's (class names, channels, root...) and a subset keeps it (``skipped`` as a copy).
    """

    #: Per-item fields a subset picks into new lists.
    PER_ITEM_LISTS: ClassVar[tuple[str, ...]] = ()
    #: Per-item numpy fields a subset indexes (``a[idx]``).
    PER_ITEM_ARRAYS: ClassVar[tuple[str, ...]] = ()

    @property
    def y(self) -> np.ndarray:
        """``(N,)`` int64 indices of ``labels`` into ``label_names``."""
        index = {name: k for k, name in enumerate(self.label_names)}  # type: ignore[attr-defined]
        return np.asarray([index[v] for v in self.labels], dtype=np.int64)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[attr-defined]

    def subset(self, keep: Sequence[int] | np.ndarray) -> Self:
        """A copy holding only the items ``keep`` (indices or a boolean mask); classes are kept."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, dtype=np.int64)
        picked = {name: [getattr(self, name)[i] for i in idx] for name in self.PER_ITEM_LISTS}
        picked |= {name: getattr(self, name)[idx] for name in self.PER_ITEM_ARRAYS}
        return dataclasses.replace(self, **picked, skipped=dict(self.skipped))  # type: ignore[type-var, attr-defined]
