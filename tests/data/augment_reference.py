"""The per-image training augmentation, built from torchvision's transforms: the oracle of ``BatchAugment``.

``openmednet.data.transforms.BatchAugment`` is the one implementation of the training augmentation
in ``src/``. This is the readable per-image pipeline it replaced (until then ``build_transform(...,
batched=False)``, output for output the same): torchvision's ``RandomResizedCrop``,
``RandomHorizontalFlip`` and ``RandomRotation`` on uint8, then the per-image colour transforms, all
with the parameters of ``openmednet.data.transforms._params``. tests/data/test_augment_oracle.py
checks ``BatchAugment``'s operations and parameter distributions against it;
``benchmarks/bench_loader.py`` times it as the baseline the batched augmentation is measured against.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from openmednet.data.transforms import (
    BRIGHTNESS,
    CONTRAST,
    CROP_RATIO,
    CROP_SCALE,
    GAMMA,
    GAMMA_P,
    HED_P,
    HED_SIGMA,
    HFLIP_P,
    HUE,
    ROTATION_DEGREES,
    SATURATION,
    FastColorJitter,
    HEDJitter,
    RandomGamma,
    ToChannels,
)
from openmednet.data.transforms._contract import _contract, _per_channel, _RequireUint8

__all__ = ["geometric", "photometric", "reference_pipeline"]


def reference_pipeline(cfg: Any, *, channels: int | None = None, image_size: int | None = None, augment: str = "auto",
                       hflip: bool = True, crop_scale: tuple[float, float] = CROP_SCALE) -> v2.Compose:
    """The per-image training pipeline of contract ``cfg`` (arguments as ``build_transform``'s).

    Returns:
        A ``v2.Compose`` mapping a uint8 ``(C_in, H, W)`` tensor to a normalised float32
        ``(channels, image_size, image_size)`` tensor; randomness from torch's global generator.
    """
    input_size = tuple(_contract(cfg, "input_size"))
    channels = int(input_size[0]) if channels is None else channels
    image_size = int(input_size[-1]) if image_size is None else image_size
    if augment == "auto":
        augment = "color" if channels == 3 else "gray"
    interpolation = InterpolationMode((cfg.get("interpolation") if isinstance(cfg, dict) else None) or "bilinear")
    return v2.Compose([
        _RequireUint8(), ToChannels(channels),
        *geometric(image_size, interpolation, hflip, crop_scale),
        v2.ToDtype(torch.float32, scale=True),
        *photometric(augment),
        v2.Normalize(_per_channel(_contract(cfg, "mean"), channels, "mean"),
                     _per_channel(_contract(cfg, "std"), channels, "std")),
    ])


def geometric(size: int, interpolation: InterpolationMode, hflip: bool, crop_scale: tuple[float, float]) -> list:
    """Crop, flip, rotation: torchvision's transforms on uint8 (its fastest CPU kernels)."""
    steps: list = [v2.RandomResizedCrop(size, scale=crop_scale, ratio=CROP_RATIO, interpolation=interpolation,
                                        antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=HFLIP_P))
    steps.append(v2.RandomRotation(ROTATION_DEGREES, interpolation=InterpolationMode.BILINEAR, fill=0))
    return steps


def photometric(augment: str) -> list:
    """Brightness, contrast (+ saturation, hue), gamma (+ HED stain jitter), on float [0, 1]."""
    if augment == "gray":
        return [FastColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST), RandomGamma(GAMMA, p=GAMMA_P)]
    return [
        FastColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST, saturation=SATURATION, hue=HUE),
        RandomGamma(GAMMA, p=GAMMA_P),
        HEDJitter(HED_SIGMA, p=HED_P),
    ]
