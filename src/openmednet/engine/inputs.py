"""``EvalInputs``: the one evaluation input pipeline, derived from a model's input contract.

A model's ``pretrained_cfg`` (its model card) says what an input looks like: channels and size
(``input_size``), ``mean``/``std`` after scaling 8-bit pixels to [0, 1]. Fine-tuning's validation
and test data, ``openmednet predict`` and the web service must turn an 8-bit image into exactly
that tensor, or a deployed model sees other inputs than the ones it was scored on. They used to
write the steps twice (with a comment saying they must match); both now call this::

    uint8 (H, W) or (H, W, 3)                     what the readers give (DICOM windowed, NIfTI sliced)
      -> to_channels(C)                           gray repeated to RGB, or RGB to BT.601 luma
      -> resize_to_square(S, mode="crop")         shorter side to S (Pillow, antialiased bilinear),
                                                  centred S x S window: what fine-tuning caches
                                                  per image, for training too (``prepare``);
                                                  segmentation: mode="stretch", the whole field of
                                                  view (``resize``, see eval.segmentation)
      -> uint8 (C, S, S) tensor                   (``to_tensor``)
      -> build_transform(contract, train=False)   float32, (x / 255 - mean) / std (``normalize``)

One difference remains outside this object: a fine-tuning target is decoded once and kept with
its shorter side at most ``max_side`` (``load_target``, 256 by default), so an image larger than
that reaches ``prepare`` already shrunk (two resizes instead of one, a small difference in the
pixels). At or below ``max_side`` the run and ``openmednet predict`` see identical tensors
(``tests/eval/test_predict_parity.py``).

The contract's ``interpolation`` is not used for the resize: training images are prepared with
the same bilinear Pillow resize (``LabelledDataset(resize_mode="crop")``), and evaluation must
match training, not the weight set's ImageNet recipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from openmednet.data.images import resize_to_square, to_channels
from openmednet.data.transforms import build_transform

__all__ = ["EvalInputs"]


class EvalInputs:
    """8-bit images to model inputs under an input contract, for evaluation and prediction.

    Args:
        contract: ``model.pretrained_cfg`` (or a mapping with ``input_size``, ``mean``, ``std``):
            channels ``C = input_size[0]``, side ``S = input_size[-1]`` (square inputs).
        resize: ``resize_to_square`` mode: ``"crop"`` (classification: shorter side to ``S``,
            centred window) or ``"stretch"`` (segmentation: both sides to ``S``, nothing cut off,
            so a prediction maps back onto every pixel of the original).

    Raises:
        ValueError: a non-square ``input_size``, channels other than 1 or 3, or another ``resize``.
    """

    def __init__(self, contract: Any, resize: Literal["crop", "stretch"] = "crop"):
        input_size = tuple(contract["input_size"] if isinstance(contract, Mapping) else contract.input_size)
        if len(input_size) != 3 or input_size[1] != input_size[2] or input_size[0] not in (1, 3):
            raise ValueError(f"input_size must be (1 or 3, S, S), got {input_size}")
        if resize not in ("crop", "stretch"):
            raise ValueError(f"resize must be 'crop' or 'stretch', got {resize!r}")
        self.channels, self.size, self.resize = int(input_size[0]), int(input_size[-1]), resize
        self.normalize = build_transform(contract, train=False)
        """uint8 ``(C, S, S)`` tensor -> float32 ``(C, S, S)`` normalised with the contract's mean/std."""

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """The 8-bit part: ``(uint8 (S, S) or (S, S, 3), converted)``, in the readers' layout.

        ``converted`` is ``True`` when the channel count changed (callers warn or note it).

        Args:
            image: ``uint8`` ``(H, W)`` or ``(H, W, 3)``.
        """
        image, converted = to_channels(image, self.channels)
        return resize_to_square(image, self.size, mode=self.resize), converted

    @staticmethod
    def to_tensor(prepared: np.ndarray) -> Tensor:
        """A prepared ``(S, S)`` / ``(S, S, 3)`` uint8 image as a uint8 ``(C, S, S)`` tensor."""
        chw = prepared[None] if prepared.ndim == 2 else prepared.transpose(2, 0, 1)
        return torch.from_numpy(np.require(chw, requirements=["C", "W"]))  # readers may hand out read-only views

    def __call__(self, image: np.ndarray) -> Tensor:
        """``prepare``, ``to_tensor``, ``normalize``: the float32 ``(C, S, S)`` model input."""
        return self.normalize(self.to_tensor(self.prepare(image)[0]))
