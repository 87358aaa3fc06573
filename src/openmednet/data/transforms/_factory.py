"""``build_transform``: a weight set's input contract -> its evaluation pipeline or training
augmentation; ``MultiViewTransform`` for self-supervised views."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from openmednet._errors import look_up_option
from openmednet.data.transforms._batch import BatchAugment
from openmednet.data.transforms._contract import (
    ToChannels,
    _contract,
    _per_channel,
    _RequireUint8,
)
from openmednet.data.transforms._params import AUGMENTS, CROP_SCALE

__all__ = ["INTERPOLATIONS", "MultiViewTransform", "build_multiview_transform", "build_transform"]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


class MultiViewTransform:
    """Several independently augmented views of one image (for SSL objectives such as SimCLR).

    Interchangeable with ``lightly.transforms.MultiViewTransform`` (same call contract), written
    here because importing ``lightly.transforms`` took about 10 s on our shared CPU machines
    (``python -X importtime``) for what is one line.

    Args:
        transforms: one transform per view.
    """

    def __init__(self, transforms: Sequence[Callable[[Tensor], Tensor]]):
        if not transforms:
            raise ValueError("MultiViewTransform needs at least one transform")
        self.transforms = list(transforms)

    def __call__(self, image: Tensor) -> list[Tensor]:
        """Return ``[t(image) for t in transforms]``: each view ``(C, H, W)`` float."""
        return [t(image) for t in self.transforms]

    @property
    def supports_batch(self) -> bool:
        """Whether every view's transform has a batched form (:class:`BatchAugment`)."""
        return all(getattr(t, "supports_batch", False) for t in self.transforms)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(views={len(self.transforms)}, transform={self.transforms[0]!r})"

    def batch(self, images: Tensor, seeds: Sequence[int] | None = None) -> list[Tensor]:
        """Views of a batch: a list of ``(B, C, S, S)`` tensors, one per view.

        View ``v`` of an image with seed ``s`` uses the seed ``(s, v)`` (hashed), so views differ.
        """
        if not self.supports_batch:
            raise TypeError(
                "MultiViewTransform.batch needs batched view transforms: build them with build_transform(..., train=True)"
            )
        views = []
        for v, transform in enumerate(self.transforms):
            view_seeds = None if seeds is None else [_view_seed(s, v) for s in seeds]
            views.append(transform.batch(images, view_seeds))
        return views


def _view_seed(seed: int, view: int) -> int:
    return int(np.random.SeedSequence([seed, view]).generate_state(1, np.uint64)[0] >> 1)


def build_transform(
    cfg: Any,
    train: bool,
    *,
    channels: int | None = None,
    image_size: int | None = None,
    augment: str | None = "auto",
    hflip: bool = True,
    crop_scale: tuple[float, float] = CROP_SCALE,
) -> v2.Compose | BatchAugment:
    """Build the preprocessing (and, for training, augmentation) pipeline of a weight set.

    Args:
        cfg: the input contract: ``model.pretrained_cfg`` or a mapping with ``input_size``
            ``(C, H, W)``, ``mean``, ``std`` (1 or C values, applied after scaling to [0, 1]) and
            optionally ``interpolation`` (``"bilinear"``, ``"bicubic"``, ``"nearest"``).
        train: the training augmentation, a :class:`BatchAugment` (applied to whole batches by the
            datasets' ``__getitems__``, or to one image when called); ``False`` gives resize +
            centre crop only.
        channels: output channels; default ``cfg.input_size[0]``. Inputs with another count are
            converted (:class:`ToChannels`).
        image_size: output side; default ``cfg.input_size[-1]``.
        augment: ``"gray"``, ``"color"``, ``None`` (no augmentation even when ``train``) or
            ``"auto"`` (``"color"`` for 3 channels, else ``"gray"``). Use ``"gray"`` for gray
            images fed to a 3-channel model, so no colour is invented.
        hflip: random horizontal flips in training (on by default; disable for targets whose
            labels depend on laterality).
        crop_scale: area range of ``RandomResizedCrop``.

    Returns:
        A callable mapping a uint8 ``(C_in, H, W)`` tensor to a float32 ``(channels, image_size,
        image_size)`` tensor normalised with the contract's mean and std (a ``BatchAugment`` also
        has ``.batch(images, seeds)`` for ``(B, C_in, H, W)`` batches).

    Raises:
        KeyError: the contract lacks a field, or names an unknown interpolation.
        ValueError: bad channels, size, augment name or mean/std length.
    """
    input_size = tuple(_contract(cfg, "input_size"))
    channels = int(input_size[0]) if channels is None else int(channels)
    image_size = int(input_size[-1]) if image_size is None else int(image_size)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    mean = _per_channel(_contract(cfg, "mean"), channels, "mean")
    std = _per_channel(_contract(cfg, "std"), channels, "std")
    interp_name = cfg.get("interpolation") if isinstance(cfg, Mapping) else getattr(cfg, "interpolation", None)
    interpolation = InterpolationMode(look_up_option(interp_name or "bilinear", INTERPOLATIONS, "interpolation"))
    if augment == "auto":
        augment = "color" if channels == 3 else "gray"
    if augment is not None and augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, 'auto' or None, got {augment!r}")
    if augment == "color" and channels != 3:
        raise ValueError(f"augment='color' needs 3 channels, got channels={channels}: use augment='gray'")

    if train and augment is not None:
        return BatchAugment(channels=channels, image_size=image_size, mean=mean, std=std, augment=augment,
                            hflip=hflip, crop_scale=crop_scale)
    return v2.Compose([
        _RequireUint8(), ToChannels(channels),
        v2.Resize(image_size, interpolation=interpolation, antialias=True), v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])


def build_multiview_transform(cfg: Any, *, views: int = 2, **kwargs: Any) -> MultiViewTransform:
    """``views`` independently augmented training views per image, for self-supervised objectives.

    Args:
        cfg: input contract, as for :func:`build_transform`.
        views: number of views (2 for SimCLR/BYOL-style objectives).
        **kwargs: keyword arguments of :func:`build_transform` (``channels``, ``image_size``,
            ``augment``, ``hflip``, ``crop_scale``; SimCLR uses a wider ``crop_scale=(0.08, 1)``).

    Returns:
        A callable giving a list of ``views`` float ``(C, S, S)`` tensors.
    """
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    return MultiViewTransform([build_transform(cfg, True, **kwargs) for _ in range(views)])
