"""The input contract's pieces: channel conversion, the uint8 check, reading a contract.

A weight set's contract (``PretrainedCfg`` or an equivalent mapping: ``input_size``, ``mean``,
``std``, ``interpolation``) decides channels, size and normalisation; ``build_transform`` turns it
into the evaluation pipeline or the training augmentation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["ToChannels"]


class ToChannels(v2.Transform):
    """Convert a ``(C, H, W)`` image to ``channels`` channels.

    1 -> 3 repeats the gray plane; 3 -> 1 uses ITU-R 601 luma (``rgb_to_grayscale``); 4 (RGBA) drops
    alpha first. Other counts raise ``ValueError``.

    Args:
        channels: 1 or 3.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (gray) or 3 (colour), got {channels}")
        self.channels = channels

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the conversion to one image tensor."""
        c = inpt.shape[-3]
        if c == self.channels:
            return inpt
        if c == 4:
            inpt, c = inpt[..., :3, :, :], 3
        if c == 1 and self.channels == 3:
            return inpt.expand(*inpt.shape[:-3], 3, *inpt.shape[-2:]).contiguous()
        if c == 3 and self.channels == 1:
            return F.rgb_to_grayscale(inpt, num_output_channels=1)
        raise ValueError(f"cannot convert an image with {c} channels to {self.channels}: expected 1, 3 or 4 channels")



class _RequireUint8:
    """Reject inputs that are not uint8 tensors: the pipeline's scaling assumes 0-255 integers.

    A plain callable, not a ``v2.Transform``: those pass unknown types (numpy arrays) through
    silently, which is exactly what this check must catch.
    """

    def __call__(self, inpt: Any) -> Any:
        if not isinstance(inpt, Tensor) or inpt.dtype != torch.uint8 or inpt.ndim < 3:
            got = f"{type(inpt).__name__} {getattr(inpt, 'dtype', '')} {tuple(getattr(inpt, 'shape', ()))}"
            raise ValueError(
                f"transforms expect a uint8 tensor (C, H, W), got {got}: "
                "convert with torch.from_numpy(array) (arrays from CorpusArrays.image are (C, S, S) uint8)"
            )
        return inpt

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _contract(cfg: Any, key: str) -> Any:
    """Read ``key`` from a ``PretrainedCfg`` (attribute) or a mapping (item)."""
    value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
    if value is None:
        raise KeyError(
            f"input contract lacks '{key}': pass a PretrainedCfg (model.pretrained_cfg) or a mapping "
            "with input_size, mean and std"
        )
    return value


def _per_channel(values: Sequence[float], channels: int, what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise ValueError(f"{what} has {len(values)} values, expected 1 or {channels} (one per channel)")
