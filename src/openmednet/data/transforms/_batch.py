"""``BatchAugment``: the training augmentation, applied to a whole batch with a few tensor ops.

The one implementation of the augmentation described in ``openmednet.data.transforms`` (its
parameters: ``_params``). tests/data/augment_reference.py holds the per-image torchvision
pipeline it replaced, as the oracle its operations and distributions are checked against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from openmednet.data.transforms._color import (
    _LUMA,
    _mix_channels,
    hed_to_rgb,
    hue_matrices,
    rgb_to_hed,
    saturation_matrices,
)
from openmednet.data.transforms._contract import ToChannels, _per_channel, _RequireUint8
from openmednet.data.transforms._params import (
    AUGMENTS,
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
)

__all__ = ["BatchAugment"]

# Uniform draws per image, in this order (one row of ``BatchAugment.draw``):
_U_SCALE, _U_RATIO, _U_CX, _U_CY, _U_FLIP, _U_ANGLE = range(6)
_U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE, _U_GAMMA_P, _U_GAMMA, _U_HED_P = range(6, 13)
_U_HED = slice(13, 19)  # alpha (3) then beta (3)
_NUM_UNIFORMS = 19


class BatchAugment:
    """The training augmentation of :func:`build_transform`, applied to a whole batch at once.

    The operations and ranges of the module docstring of ``openmednet.data.transforms``: every
    image's parameters are drawn from 19 uniforms (:meth:`params`) and applied with batched tensor
    ops, so a batch of 64 costs a handful of kernel calls instead of the ~600 small ones of a
    per-image torchvision pipeline (kept as the test oracle, tests/data/augment_reference.py):

    - crop, flip and rotation are one affine map per image, sampled with one ``grid_sample`` for
      the batch (one interpolation instead of two; rotated corners take image content, or zero
      outside it). The crop's side and aspect are drawn as in ``RandomResizedCrop`` but clamped to
      the image instead of re-drawn. Images whose shorter side exceeds
      ``image_size / sqrt(crop_scale[0])`` are first resized to it (antialiased, aspect kept), so
      a minimum-area crop is sampled about 1:1 and a full-image crop is downsampled at most
      ``1 / sqrt(crop_scale[0])`` times (1.4x by default) without antialiasing.
    - brightness, contrast, saturation, hue, gamma and HED stain jitter are per-image factors
      broadcast over the batch (the per-image forms: :func:`color_jitter`, :class:`RandomGamma`,
      :func:`hed_jitter`).

    With ``seeds`` (one per image, as the samplers hand them out), an image's parameters depend on
    its seed only: the same image and seed give the same output in any batch, alone or with others.

    Args:
        channels: output channels (inputs are converted as by :class:`ToChannels`).
        image_size: output side.
        mean, std: per-channel normalisation.
        augment: ``"gray"`` or ``"color"``.
        hflip: random horizontal flips.
        crop_scale: area range of the crop.
    """

    def __init__(
        self,
        *,
        channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: str,
        hflip: bool = True,
        crop_scale: tuple[float, float] = CROP_SCALE,
    ):
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        self.channels, self.image_size, self.augment = channels, image_size, augment
        self.hflip, self.crop_scale = hflip, crop_scale
        self.mean = torch.tensor(_per_channel(mean, channels, "mean")).view(1, -1, 1, 1)
        self.std = torch.tensor(_per_channel(std, channels, "std")).view(1, -1, 1, 1)
        self.to_channels = ToChannels(channels)
        self.work_size = math.ceil(image_size / math.sqrt(crop_scale[0]))

    #: datasets may call :meth:`batch` from ``__getitems__``
    supports_batch = True

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(augment={self.augment!r}, channels={self.channels}, image_size={self.image_size}, "
            f"hflip={self.hflip}, crop_scale={self.crop_scale})"
        )

    def __call__(self, image: Tensor) -> Tensor:
        """Augment one uint8 ``(C, H, W)`` image (a batch of one; global torch RNG)."""
        return self.batch(_RequireUint8()(image)[None])[0]

    def draw(self, n: int, seeds: Sequence[int] | None) -> Tensor:
        """``(n, 19)`` uniforms in [0, 1): from each image's seed, or from torch's global generator."""
        if seeds is None:
            return torch.rand(n, _NUM_UNIFORMS)
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} images: pass one seed per image")
        gen = torch.Generator()
        return torch.stack([torch.rand(_NUM_UNIFORMS, generator=gen.manual_seed(int(s))) for s in seeds])

    def batch(self, images: Tensor, seeds: Sequence[int] | None = None) -> Tensor:
        """Augment a batch.

        Args:
            images: ``(B, C, H, W)`` uint8.
            seeds: optional per-image seeds (see the class docstring).

        Returns:
            ``(B, channels, image_size, image_size)`` float32, normalised.
        """
        if images.dtype != torch.uint8 or images.ndim != 4:
            got = f"{images.dtype} {tuple(images.shape)}"
            raise ValueError(f"BatchAugment.batch expects a uint8 (B, C, H, W) tensor, got {got}")
        u = self.draw(len(images), seeds)
        x = self.to_channels(images).float().div_(255)
        short = min(x.shape[-2:])
        if short > self.work_size:  # shorter side to work_size, aspect kept
            size = tuple(round(side * self.work_size / short) for side in x.shape[-2:])
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)
        x = self._geometry(x, u)
        x = self._photometric(x, u)
        return (x - self.mean) / self.std

    def params(self, u: Tensor) -> dict[str, Tensor]:
        """The per-image parameters that draws ``u`` ``(B, 19)`` give: what :meth:`_geometry` and
        :meth:`_photometric` apply, and what the test oracle compares with torchvision's draws.

        Returns:
            ``(B,)`` tensors ``area`` (crop area fraction), ``ratio`` (crop aspect), ``flip`` and
            ``angle`` (degrees); ``brightness``, ``contrast``, ``saturation`` (factors), ``hue``
            (turns), ``gamma`` with ``apply_gamma``; ``hed_alpha``, ``hed_beta`` ``(B, 3)`` with
            ``apply_hed``. Saturation, hue and HED are applied by ``augment="color"`` only.
        """
        low, high = self.crop_scale
        log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        gamma_low, gamma_high = math.log(GAMMA[0]), math.log(GAMMA[1])
        ab = (2 * u[:, _U_HED] - 1) * HED_SIGMA
        return {
            "area": low + (high - low) * u[:, _U_SCALE],
            "ratio": torch.exp(log_low + (log_high - log_low) * u[:, _U_RATIO]),
            "flip": (u[:, _U_FLIP] < HFLIP_P) & self.hflip,
            "angle": (2 * u[:, _U_ANGLE] - 1) * ROTATION_DEGREES,
            "brightness": 1 + (2 * u[:, _U_BRIGHT] - 1) * BRIGHTNESS,
            "contrast": 1 + (2 * u[:, _U_CONTRAST] - 1) * CONTRAST,
            "saturation": 1 + (2 * u[:, _U_SAT] - 1) * SATURATION,
            "hue": (2 * u[:, _U_HUE] - 1) * HUE,
            "gamma": torch.exp(gamma_low + (gamma_high - gamma_low) * u[:, _U_GAMMA]),
            "apply_gamma": u[:, _U_GAMMA_P] < GAMMA_P,
            "hed_alpha": 1 + ab[:, :3],
            "hed_beta": ab[:, 3:],
            "apply_hed": u[:, _U_HED_P] < HED_P,
        }

    def _geometry(self, x: Tensor, u: Tensor) -> Tensor:
        """Crop (area and aspect as ``RandomResizedCrop``), flip and rotate in one resampling."""
        h, w = x.shape[-2:]
        p = self.params(u)
        area, ratio = p["area"], p["ratio"]
        # crop side as a fraction of the image side, clamped to the image
        fw = torch.sqrt(area * ratio * h / w).clamp(max=1.0)
        fh = torch.sqrt(area / ratio * w / h).clamp(max=1.0)
        cx = (1 - fw) * (2 * u[:, _U_CX] - 1)
        cy = (1 - fh) * (2 * u[:, _U_CY] - 1)
        flip = torch.where(p["flip"], -1.0, 1.0)
        angle = torch.deg2rad(p["angle"])
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output (x, y) in [-1, 1] -> input coordinates, rotating in pixel units so non-square
        # crops are not sheared: diag(2/w, 2/h) R diag(fw*w/2*flip, fh*h/2)
        theta = torch.stack(
            [
                torch.stack([cos * fw * flip, -sin * fh * h / w, cx], dim=1),
                torch.stack([sin * fw * flip * w / h, cos * fh, cy], dim=1),
            ],
            dim=1,
        )
        size = (len(x), x.shape[1], self.image_size, self.image_size)
        grid = torch.nn.functional.affine_grid(theta, size, align_corners=False)
        return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _photometric(self, x: Tensor, u: Tensor) -> Tensor:
        """Brightness, contrast (+ saturation, hue), gamma (+ HED), per image, clamped to [0, 1]."""
        per_image = (len(x), 1, 1, 1)
        p = self.params(u)
        brightness, contrast = p["brightness"], p["contrast"]
        means = x.mean(dim=(-2, -1))
        gray_mean = brightness * (means[:, 0] if x.shape[1] == 1 else means @ torch.tensor(_LUMA))
        # brightness then contrast, fused: (x b) c + (1 - c) mean(x b), one pass over the pixels
        offset = ((1 - contrast) * gray_mean).view(per_image)
        x = torch.addcmul(offset, x, (brightness * contrast).view(per_image))
        if self.augment == "color":
            x = _mix_channels(hue_matrices(p["hue"]) @ saturation_matrices(p["saturation"]), x)
        x = x.clamp_(0.0, 1.0)
        gamma, apply = p["gamma"], p["apply_gamma"]
        if apply.any():  # only the images that drew a gamma pay for the power
            x[apply] = x[apply].pow(gamma[apply].view(-1, 1, 1, 1))
        if self.augment == "color":
            apply = p["apply_hed"]
            if apply.any():
                alpha, beta = p["hed_alpha"], p["hed_beta"]
                hed = rgb_to_hed(x[apply]) * alpha[apply].view(-1, 3, 1, 1) + beta[apply].view(-1, 3, 1, 1)
                x[apply] = hed_to_rgb(hed)
        return x
