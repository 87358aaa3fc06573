"""Colour operations on float images in [0, 1]: H&E stain space, hue and saturation matrices, and
their per-image ``v2.Transform`` forms (``FastColorJitter``, ``RandomGamma``, ``HEDJitter``).

``BatchAugment`` applies the same matrices and stain conversions to whole batches; the per-image
transforms are for single images in a torchvision pipeline, and serve the test oracle of the
batched augmentation (tests/data/augment_reference.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

from openmednet.data.transforms._params import GAMMA, GAMMA_P, HED_P, HED_SIGMA

__all__ = [
    "HED_FROM_RGB",
    "RGB_FROM_HED",
    "FastColorJitter",
    "HEDJitter",
    "RandomGamma",
    "color_jitter",
    "hed_jitter",
    "hed_to_rgb",
    "hue_matrices",
    "hue_matrix",
    "rgb_to_hed",
    "saturation_matrices",
    "saturation_matrix",
]

# Ruifrok & Johnston (2001) stain vectors, rows = haematoxylin, eosin, DAB, columns = R, G, B optical
# density; identical to skimage.color.rgb_from_hed (checked by tests/data/test_transforms.py).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
# skimage clips intensities at 1e-6 before the log and divides optical densities by -log(1e-6), so
# stain concentrations are of order 0.1; keeping its scale keeps Tellez's sigma values meaningful.
_LOG_ADJUST = math.log(1e-6)


class RandomGamma(v2.Transform):
    """Random gamma correction ``x ** gamma`` of a float image in [0, 1].

    ``gamma`` is drawn log-uniformly from ``gamma_range`` so ``g`` and ``1/g`` are equally likely.
    The same gamma applies to every channel (no colour shift).

    Args:
        gamma_range: ``(low, high)``, both > 0.
        p: probability of applying it.
    """

    def __init__(self, gamma_range: tuple[float, float] = GAMMA, p: float = GAMMA_P):
        super().__init__()
        low, high = gamma_range
        if not 0 < low <= high:
            raise ValueError(f"gamma_range must satisfy 0 < low <= high, got {gamma_range}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.log_range = (math.log(low), math.log(high))
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw whether to apply and the gamma value."""
        if torch.rand(()) >= self.p:
            return {"gamma": None}
        low, high = self.log_range
        return {"gamma": math.exp(low + (high - low) * float(torch.rand(())))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the drawn gamma to one float image."""
        if params["gamma"] is None:
            return inpt
        _check_float(inpt, "RandomGamma")
        return inpt.clamp(0.0, 1.0).pow(params["gamma"])



def rgb_to_hed(rgb: Tensor) -> Tensor:
    """Stain concentrations of an RGB image, as ``skimage.color.rgb2hed`` computes them.

    Args:
        rgb: ``(..., 3, H, W)`` float in [0, 1].

    Returns:
        ``(..., 3, H, W)`` haematoxylin, eosin, DAB concentrations (>= 0, of order 0.1).
    """
    od = torch.log(rgb.clamp_min(1e-6)) / _LOG_ADJUST
    return _mix_channels(HED_FROM_RGB.T.to(rgb.dtype), od).clamp_min(0.0)


def hed_to_rgb(hed: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hed`, as ``skimage.color.hed2rgb`` computes it; output in [0, 1]."""
    log_rgb = _mix_channels(RGB_FROM_HED.T.to(hed.dtype), hed * _LOG_ADJUST)
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def _mix_channels(matrix: Tensor, image: Tensor) -> Tensor:
    """``out[..., d, h, w] = sum_c matrix[..., d, c] * image[..., c, h, w]`` as one (batched) matmul.

    ``matrix`` is ``(3, 3)`` or ``(B, 3, 3)``; a matmul over ``(3, H*W)`` runs several times faster
    than the equivalent ``einsum`` on CPU.
    """
    flat = image.reshape(*image.shape[:-2], -1)
    return (matrix @ flat).reshape(image.shape)


class HEDJitter(v2.Transform):
    """H&E stain augmentation in HED space (Tellez et al. 2018, 2019).

    For each stain channel ``i`` of :func:`rgb_to_hed`: ``s_i' = alpha_i * s_i + beta_i`` with
    ``alpha_i ~ U(1 - sigma, 1 + sigma)`` and ``beta_i ~ U(-sigma, sigma)``, then back to RGB.
    ``sigma = 0.05`` is Tellez's "HED-light", ``0.2`` "HED-strong".

    Args:
        sigma: perturbation strength (>= 0).
        p: probability of applying it.
    """

    def __init__(self, sigma: float = HED_SIGMA, p: float = HED_P):
        super().__init__()
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.sigma = sigma
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw whether to apply, and the per-stain ``alpha`` and ``beta`` (3 each)."""
        if torch.rand(()) >= self.p:
            return {"alpha": None, "beta": None}
        alpha = 1.0 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.sigma
        return {"alpha": alpha, "beta": beta}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the drawn perturbation to one float RGB image."""
        if params["alpha"] is None:
            return inpt
        _check_float(inpt, "HEDJitter")
        if inpt.shape[-3] != 3:
            raise ValueError(f"HEDJitter needs RGB images (3 channels), got {inpt.shape[-3]}: use augment='gray'")
        return hed_jitter(inpt, params["alpha"], params["beta"])


def hed_jitter(rgb: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Deterministic core of :class:`HEDJitter`.

    Args:
        rgb: ``(3, H, W)`` float in [0, 1].
        alpha, beta: ``(3,)`` scale and shift of the H, E, D concentrations.

    Returns:
        ``(3, H, W)`` float in [0, 1], same dtype as ``rgb``.
    """
    hed = rgb_to_hed(rgb)
    hed = hed * alpha.to(hed.dtype).view(3, 1, 1) + beta.to(hed.dtype).view(3, 1, 1)
    return hed_to_rgb(hed)


# Rec. 709 luma weights: the gray axis of the W3C Filter Effects colour matrices used below.
_LUMA = (0.2126, 0.7152, 0.0722)


# hue_matrix(t) = L + cos(2 pi t) (I - L) + sin(2 pi t) _HUE_SIN, with L the luma projection
# (every row = _LUMA); _HUE_SIN is the W3C sine term.
_HUE_SIN = torch.tensor(
    [[-_LUMA[0], -_LUMA[1], 1 - _LUMA[2]], [0.143, 0.140, -0.283], [-(1 - _LUMA[0]), _LUMA[1], _LUMA[2]]]
)


def hue_matrices(turns: Tensor) -> Tensor:
    """``(B, 3, 3)`` RGB matrices rotating hue by ``turns`` ``(B,)`` of a full circle about the gray axis.

    The W3C Filter Effects ``feColorMatrix type="hueRotate"`` matrix: linear, so it costs one small
    matrix product instead of torchvision's RGB -> HSV -> RGB round trip (the slowest step of the
    colour pipeline before this). It keeps gray pixels gray and approximates an HSV hue shift.
    """
    luma = torch.tensor(_LUMA).expand(3, 3)
    angle = (2 * math.pi * turns.double()).float().view(-1, 1, 1)
    return luma + torch.cos(angle) * (torch.eye(3) - luma) + torch.sin(angle) * _HUE_SIN


def saturation_matrices(factors: Tensor) -> Tensor:
    """``(B, 3, 3)`` saturation matrices (W3C ``feColorMatrix type="saturate"``) for ``factors`` ``(B,)``.

    ``1`` is the identity, ``0`` gives luma gray, ``> 1`` over-saturates; gray stays gray.
    """
    luma = torch.tensor(_LUMA).expand(3, 3)
    s = factors.float().view(-1, 1, 1)
    return luma * (1 - s) + torch.eye(3) * s


def hue_matrix(turns: float) -> Tensor:
    """``(3, 3)`` matrix of :func:`hue_matrices` for one shift."""
    return hue_matrices(torch.tensor([turns]))[0]


def saturation_matrix(s: float) -> Tensor:
    """``(3, 3)`` matrix of :func:`saturation_matrices` for one factor."""
    return saturation_matrices(torch.tensor([s]))[0]


def color_jitter(img: Tensor, brightness: float, contrast: float, saturation: float = 1.0, hue: float = 0.0) -> Tensor:
    """Deterministic core of :class:`FastColorJitter`, in the fixed order brightness, contrast, saturation, hue.

    Args:
        img: ``(C, H, W)`` float in [0, 1], ``C`` 1 or 3 (saturation and hue need 3).
        brightness: factor multiplying all values.
        contrast: factor blending with the image's mean luma (``0`` gives a flat image).
        saturation: factor of :func:`saturation_matrix`.
        hue: shift in turns, for :func:`hue_matrix`.

    Returns:
        ``(C, H, W)`` float clamped to [0, 1] once, at the end.
    """
    out = img * brightness
    channels = out.shape[-3]
    if contrast != 1.0:
        means = out.mean(dim=(-2, -1))
        # mean luma = luma weights . channel means (cheaper than building the gray image)
        gray_mean = means[0] if channels == 1 else means @ torch.tensor(_LUMA, dtype=out.dtype)
        out = out * contrast + (1 - contrast) * gray_mean
    if saturation != 1.0 or hue != 0.0:
        if channels != 3:
            raise ValueError(f"saturation and hue jitter need RGB images, got {channels} channel(s)")
        matrix = (hue_matrix(hue) @ saturation_matrix(saturation)).to(out.dtype)
        out = (matrix @ out.reshape(3, -1)).reshape(out.shape)
    return out.clamp_(0.0, 1.0)


class FastColorJitter(v2.Transform):
    """Random brightness, contrast, saturation and hue, fused into one pass per image.

    Same factor ranges as ``torchvision.transforms.v2.ColorJitter`` (``brightness=0.2`` draws a
    factor in ``[0.8, 1.2]``; ``hue=0.05`` a shift in ``[-0.05, 0.05]`` turns), but with a fixed
    order, one clamp at the end and a linear hue rotation (:func:`hue_matrix`): several times
    cheaper on 64 px RGB images (``benchmarks/bench_loader.py`` times both), the largest single
    saving of the colour pipeline. With ``saturation=hue=0`` every channel gets the same factors,
    so gray images stay gray.

    Args:
        brightness, contrast, saturation: maximum relative change (>= 0).
        hue: maximum shift in turns, in [0, 0.5].
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0):
        super().__init__()
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] turns, got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the four factors (each uniform in its range)."""
        u = (torch.rand(4) * 2 - 1).tolist()
        return {
            "brightness": 1 + u[0] * self.brightness,
            "contrast": 1 + u[1] * self.contrast,
            "saturation": 1 + u[2] * self.saturation,
            "hue": u[3] * self.hue,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the drawn factors to one float image."""
        _check_float(inpt, "FastColorJitter")
        return color_jitter(inpt, **params)



def _check_float(inpt: Tensor, name: str) -> None:
    if not inpt.is_floating_point():
        raise ValueError(f"{name} expects a float image in [0, 1], got dtype {inpt.dtype}: place it after ToDtype")
