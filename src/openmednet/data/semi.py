"""Data for semi-supervised fine-tuning: unlabelled images as a dataset, and the strong augmentation.

- ``UnlabelledDataset``: decoded images without labels, cached as uint8 ``(N, C, S, S)`` like
  ``LabelledDataset`` (same channel conversion and resize), yielding ``(view(s), -1)`` so the
  fine-tuning loop and ``predict_proba`` treat it as any other loader.
- ``StrongAugment``: RandAugment (Cubuk et al. 2020; torchvision's ``v2.RandAugment``, the well-kept
  implementation FixMatch and Noisy Student both name), then the run's usual training augmentation
  (``BatchAugment``: crop, flip, rotation, photometric jitter, normalisation), then Cutout
  (``v2.RandomErasing`` on one patch), as in FixMatch's "strong" view (Sohn et al. 2020, sec. 2.3).

Gray and colour: RandAugment's only colour operation ("Color", a saturation blend) is the identity on
gray content, and its other operations act on every channel alike, so gray images (1 channel, or gray
repeated to 3 for an RGB init) stay gray; the ``BatchAugment`` it wraps is the run's, built with
``augment="gray"`` for gray targets, so no colour is invented. Colour targets also get its hue,
saturation and H&E stain jitter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from openmednet.data.datasets import _batched, _split_key, apply_batch_transform, apply_transform
from openmednet.data.images import resize_to_square, to_channels

__all__ = ["UNLABELLED", "StrongAugment", "UnlabelledDataset"]

#: Label of every unlabelled item (never a class index).
UNLABELLED = -1

#: RandAugment settings: FixMatch's RandAugment draws 2 operations per image (sec. 2.3); magnitude
#: 9 of 31 bins is torchvision's default and RandAugment's ImageNet setting for ResNet-50.
RANDAUGMENT_OPS = 2
RANDAUGMENT_MAGNITUDE = 9
#: Cutout (as ``RandomErasing``): one patch of 2-25% of the image area, filled with the mean (0 after
#: normalisation). FixMatch's Cutout is a square of up to half the side, i.e. up to 25% of the area.
CUTOUT_SCALE = (0.02, 0.25)


class StrongAugment:
    """FixMatch's strong view: RandAugment on the uint8 image, the run's augmentation, then Cutout.

    Args:
        base: the run's training augmentation (a ``BatchAugment`` from ``build_transform(...,
            train=True)``); it converts channels, crops, jitters and normalises.
        num_ops: RandAugment operations per image.
        magnitude: RandAugment magnitude (0-30).
        cutout: apply Cutout (``False`` for Noisy Student's student, which uses RandAugment alone).

    With per-image ``seeds`` (as the samplers hand out), an image's strong view depends only on its
    seed, like ``BatchAugment``'s; without, the draws come from torch's global generator.
    """

    supports_batch = True

    def __init__(self, base: Any, *, num_ops: int = RANDAUGMENT_OPS, magnitude: int = RANDAUGMENT_MAGNITUDE,
                 cutout: bool = True):
        if not getattr(base, "supports_batch", False):
            raise TypeError(f"StrongAugment wraps a batched training transform (BatchAugment), got {type(base).__name__}: "
                            f"build it with build_transform(cfg, train=True)")
        self.base, self.cutout = base, cutout
        self.randaugment = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
        self.erase = v2.RandomErasing(p=1.0, scale=CUTOUT_SCALE, value=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(randaugment={self.randaugment!r}, cutout={self.cutout}, base={self.base!r})"

    def __call__(self, image: Tensor) -> Tensor:
        """One uint8 ``(C, H, W)`` image -> float ``(C', S, S)`` (global torch RNG)."""
        return self.batch(image[None])[0]

    def batch(self, images: Tensor, seeds: Sequence[int] | None = None) -> Tensor:
        """Strong views of a uint8 ``(B, C, H, W)`` batch -> float ``(B, C', S, S)``, normalised."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"StrongAugment.batch expects a uint8 (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        # RandAugment draws one operation set per call: call it per image so images differ.
        x = torch.stack([self._seeded(self.randaugment, img, seeds, i, 0) for i, img in enumerate(images)])
        x = self.base.batch(x, None if seeds is None else [s ^ 0x5EED for s in seeds])
        if self.cutout:
            x = torch.stack([self._seeded(self.erase, img, seeds, i, 1) for i, img in enumerate(x)])
        return x

    @staticmethod
    def _seeded(transform: Any, image: Tensor, seeds: Sequence[int] | None, i: int, salt: int) -> Tensor:
        return apply_transform(transform, image, None if seeds is None else int(seeds[i]) * 2 + salt)


class UnlabelledDataset(Dataset):
    """Unlabelled images cached as uint8 ``(N, C, S, S)``; items are ``(transform(image), -1)``.

    Args:
        images: ``(H, W)`` or ``(H, W, 3)`` uint8 arrays.
        channels: the model's input channels (1 or 3); other images are converted.
        image_size: side of the cached square images.
        transform: e.g. the evaluation transform (teacher predictions), or a
            ``MultiViewTransform([weak, strong])`` (FixMatch); batched transforms run per batch.
        resize_mode: ``"crop"`` (centre square, as fine-tuning prepares every image) or ``"pad"``.

    Keys are indices or ``(index, seed)`` pairs, as for ``LabelledDataset``.
    """

    supports_seeded_keys = True

    def __init__(self, images: Sequence[np.ndarray], *, channels: int, image_size: int, transform: Any = None,
                 resize_mode: str = "crop"):
        if not len(images):
            raise ValueError("UnlabelledDataset needs at least one image")
        cached = []
        for image in images:
            image = resize_to_square(to_channels(np.asarray(image), channels)[0], image_size, mode=resize_mode)
            cached.append(image[None] if image.ndim == 2 else image.transpose(2, 0, 1))
        self.images = np.ascontiguousarray(np.stack(cached))
        self.labels = np.full(len(cached), UNLABELLED, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Any) -> tuple[Any, int]:
        i, seed = _split_key(key)
        return apply_transform(self.transform, torch.from_numpy(self.images[i]), seed), UNLABELLED

    def __getitems__(self, keys: list[Any]) -> list[tuple[Any, int]]:
        """A batch (the DataLoader calls this): batched transforms run once per batch."""
        if not _batched(self.transform):
            return [self[k] for k in keys]
        index, seeds = zip(*map(_split_key, keys))
        outputs = apply_batch_transform(self.transform, torch.from_numpy(self.images[list(index)]), list(seeds))
        return [(o, UNLABELLED) for o in outputs]
