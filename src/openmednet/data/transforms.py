"""Image transforms: uint8 ``(C, H, W)`` tensors in, normalised float tensors out.

``build_transform`` turns a weight set's input contract (``PretrainedCfg`` or an equivalent mapping:
``input_size``, ``mean``, ``std``, ``interpolation``) into a ``torchvision.transforms.v2`` pipeline,
so the preprocessing travels with the weights (torchvision's ``Weights.transforms`` habit).

Training augmentation, per version (each choice and its source):

- Both versions, geometry (on uint8, before the float conversion, because uint8 resampling is
  the fastest path of torchvision's CPU kernels):

  - ``RandomResizedCrop(scale=(0.5, 1))``: the standard ImageNet crop (Szegedy et al. 2015) with a
    higher minimum area than its 0.08, because a lesion or organ can fill a small part of a medical
    image and an 8 % crop often misses it (SSL objectives that want harder views pass ``crop_scale``).
  - Horizontal flip, p = 0.5, **on by default**. Most pre-training images tolerate it (a chest X-ray
    flipped is still a chest X-ray to a feature extractor), but it destroys laterality: situs
    (heart on the left), "left/right knee" or DICOM orientation labels. Pass ``hflip=False`` for
    targets whose labels depend on side. No vertical flip: anatomy has a fixed up/down.
  - ``RandomRotation(+-10 deg)``, bilinear, zero fill: patient positioning varies by a few degrees;
    larger angles move anatomy to places it never is and fill corners with black.

- Gray (``augment="gray"``), photometric, on float values in [0, 1]:

  - brightness and contrast factors in ``[0.8, 1.2]``: exposure and window differences between
    scanners and sites.
  - random gamma in ``[0.8, 1.25]`` (log-uniform, so brightening and darkening are equally likely),
    p = 0.5: the non-linear intensity response differences of detectors and of DICOM VOI LUTs
    (nnU-Net's gamma augmentation uses a similar range, 0.7-1.5).
  - no colour jitter: the same factor is applied to every channel, so a gray image replicated to
    three channels stays gray.

- Colour (``augment="color"``): the gray operations plus

  - saturation factor in ``[0.8, 1.2]`` and hue shift of ``+-0.05`` turns (:class:`FastColorJitter`,
    a fused equivalent of torchvision's ``ColorJitter``): mild, because colour carries diagnostic meaning in
    dermoscopy (blue-white veil) and blood smears (stain affinity); HSV perturbation is one of the
    two best-performing colour augmentations in Tellez et al. 2019.
  - H&E stain jitter (``HEDJitter``), p = 0.5: each channel of the haematoxylin-eosin-DAB
    decomposition (Ruifrok & Johnston 2001, the matrix of ``skimage.color.rgb2hed``) is scaled by
    ``U(1 - s, 1 + s)`` and shifted by ``U(-s, s)``, ``s = 0.05`` ("HED-light"), as proposed by
    Tellez et al. 2018 (IEEE TMI 37(9), mitosis detection) and found among the best colour
    augmentations by Tellez et al. 2019 (Medical Image Analysis 58, 101544). It models staining
    variation between labs; on non-histology colour images it acts as a mild colour perturbation.

Evaluation: resize of the shorter side to ``image_size`` and a centre crop, nothing random.

Randomness comes from torch's global generator (so ``torch.manual_seed`` makes a pipeline
reproducible), or, for ``BatchAugment.batch``, from one seed per image (the samplers' seeded keys,
see ``openmednet.data.samplers``).

Two implementations of the same training augmentation:

- :class:`BatchAugment` (``build_transform(..., train=True)``, the default): per-image random
  parameters, applied to a whole batch with a few tensor ops (crop, flip and rotation as one
  ``grid_sample``; photometric factors broadcast). ``CorpusDataset`` and ``LabelledDataset`` call
  it from ``__getitems__``, which the DataLoader uses for every batch. It was written because
  at 64 px MedNet trains at about 175 img/s on an idle 2-core machine (bf16 on AMX), and the
  per-image pipeline fed only 6-9x that from one core (``benchmarks/bench_loader.py``;
  docs/benchmarks.md, "Loader").
- the per-image ``v2.Compose`` pipeline (``batched=False``): torchvision's own transforms, one
  image per call; kept for single images and as the readable reference of what is done.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from openmednet._errors import look_up_option

__all__ = [
    "AUGMENTS",
    "BatchAugment",
    "FastColorJitter",
    "HEDJitter",
    "MultiViewTransform",
    "RandomGamma",
    "ToChannels",
    "build_multiview_transform",
    "build_transform",
]

AUGMENTS = ("gray", "color")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

# Ruifrok & Johnston (2001) stain vectors, rows = haematoxylin, eosin, DAB, columns = R, G, B optical
# density; identical to skimage.color.rgb_from_hed (checked by tests/data/test_transforms.py).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
# skimage clips intensities at 1e-6 before the log and divides optical densities by -log(1e-6), so
# stain concentrations are of order 0.1; keeping its scale keeps Tellez's sigma values meaningful.
_LOG_ADJUST = math.log(1e-6)

# Augmentation strengths (see the module docstring for the source of each).
CROP_SCALE = (0.5, 1.0)
ROTATION_DEGREES = 10.0
BRIGHTNESS = 0.2
CONTRAST = 0.2
GAMMA = (0.8, 1.25)
SATURATION = 0.2
HUE = 0.05
HED_SIGMA = 0.05


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


class RandomGamma(v2.Transform):
    """Random gamma correction ``x ** gamma`` of a float image in [0, 1].

    ``gamma`` is drawn log-uniformly from ``gamma_range`` so ``g`` and ``1/g`` are equally likely.
    The same gamma applies to every channel (no colour shift).

    Args:
        gamma_range: ``(low, high)``, both > 0.
        p: probability of applying it.
    """

    def __init__(self, gamma_range: tuple[float, float] = GAMMA, p: float = 0.5):
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

    def __init__(self, sigma: float = HED_SIGMA, p: float = 0.5):
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

    def batch(self, images: Tensor, seeds: Sequence[int] | None = None) -> list[Tensor]:
        """Views of a batch: a list of ``(B, C, S, S)`` tensors, one per view.

        View ``v`` of an image with seed ``s`` uses the seed ``(s, v)`` (hashed), so views differ.
        """
        if not self.supports_batch:
            raise TypeError(
                "MultiViewTransform.batch needs batched view transforms: build them with build_transform(..., batched=True)"
            )
        views = []
        for v, transform in enumerate(self.transforms):
            view_seeds = None if seeds is None else [_view_seed(s, v) for s in seeds]
            views.append(transform.batch(images, view_seeds))
        return views


def _view_seed(seed: int, view: int) -> int:
    return int(np.random.SeedSequence([seed, view]).generate_state(1, np.uint64)[0] >> 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(views={len(self.transforms)}, transform={self.transforms[0]!r})"


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


def build_transform(
    cfg: Any,
    train: bool,
    *,
    channels: int | None = None,
    image_size: int | None = None,
    augment: str | None = "auto",
    hflip: bool = True,
    crop_scale: tuple[float, float] = CROP_SCALE,
    batched: bool = True,
) -> v2.Compose | BatchAugment:
    """Build the preprocessing (and, for training, augmentation) pipeline of a weight set.

    Args:
        cfg: the input contract: ``model.pretrained_cfg`` or a mapping with ``input_size``
            ``(C, H, W)``, ``mean``, ``std`` (1 or C values, applied after scaling to [0, 1]) and
            optionally ``interpolation`` (``"bilinear"``, ``"bicubic"``, ``"nearest"``).
        train: add random augmentation; ``False`` gives resize + centre crop only.
        channels: output channels; default ``cfg.input_size[0]``. Inputs with another count are
            converted (:class:`ToChannels`).
        image_size: output side; default ``cfg.input_size[-1]``.
        augment: ``"gray"``, ``"color"``, ``None`` (no augmentation even when ``train``) or
            ``"auto"`` (``"color"`` for 3 channels, else ``"gray"``). Use ``"gray"`` for gray
            images fed to a 3-channel model, so no colour is invented.
        hflip: random horizontal flips in training (on by default; disable for targets whose
            labels depend on laterality).
        crop_scale: area range of ``RandomResizedCrop``.
        batched: for training, return a :class:`BatchAugment` (same operations, applied to whole
            batches by the datasets' ``__getitems__``; several times faster, see
            docs/benchmarks.md) instead of the per-image ``v2.Compose`` pipeline.

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

    if train and augment is not None and batched:
        return BatchAugment(channels=channels, image_size=image_size, mean=mean, std=std, augment=augment,
                            hflip=hflip, crop_scale=crop_scale)
    steps: list[Callable[[Any], Any]] = [_RequireUint8(), ToChannels(channels)]
    if train and augment is not None:
        steps += _geometric(image_size, interpolation, hflip, crop_scale)
    else:
        steps += [v2.Resize(image_size, interpolation=interpolation, antialias=True), v2.CenterCrop(image_size)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train and augment is not None:
        steps += _photometric(augment)
    steps.append(v2.Normalize(mean, std))
    return v2.Compose(steps)


def _geometric(size: int, interpolation: InterpolationMode, hflip: bool, crop_scale: tuple[float, float]) -> list:
    steps: list = [v2.RandomResizedCrop(size, scale=crop_scale, interpolation=interpolation, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps.append(v2.RandomRotation(ROTATION_DEGREES, interpolation=InterpolationMode.BILINEAR, fill=0))
    return steps


def _photometric(augment: str) -> list:
    if augment == "gray":
        return [FastColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST), RandomGamma(GAMMA, p=0.5)]
    return [
        FastColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST, saturation=SATURATION, hue=HUE),
        RandomGamma(GAMMA, p=0.5),
        HEDJitter(HED_SIGMA, p=0.5),
    ]


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


# ------------------------------------------------------------------------------- batched augmentation
# Uniform draws per image, in this order (one row of ``BatchAugment.draw``):
_U_SCALE, _U_RATIO, _U_CX, _U_CY, _U_FLIP, _U_ANGLE = range(6)
_U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE, _U_GAMMA_P, _U_GAMMA, _U_HED_P = range(6, 13)
_U_HED = slice(13, 19)  # alpha (3) then beta (3)
_NUM_UNIFORMS = 19


class BatchAugment:
    """The training augmentation of :func:`build_transform`, applied to a whole batch at once.

    Same operations and ranges as the per-image pipeline (module docstring), but every image's
    parameters are drawn from 19 uniforms and applied with batched tensor ops, so a batch of 64
    costs a handful of kernel calls instead of ~600 small ones:

    - crop, flip and rotation are one affine map per image, sampled with one ``grid_sample`` for
      the batch (one interpolation instead of two; rotated corners take image content, or zero
      outside it). The crop's side and aspect are drawn as in ``RandomResizedCrop`` but clamped to
      the image instead of re-drawn. Images whose shorter side exceeds
      ``image_size / sqrt(crop_scale[0])`` are first resized to it (antialiased, aspect kept), so
      a minimum-area crop is sampled about 1:1 and a full-image crop is downsampled at most
      ``1 / sqrt(crop_scale[0])`` times (1.4x by default) without antialiasing.
    - brightness, contrast, saturation, hue, gamma and HED stain jitter are per-image factors
      broadcast over the batch (:func:`color_jitter`, :class:`RandomGamma`, :func:`hed_jitter`).

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

    def _geometry(self, x: Tensor, u: Tensor) -> Tensor:
        """Crop (area and aspect as ``RandomResizedCrop``), flip and rotate in one resampling."""
        h, w = x.shape[-2:]
        low, high = self.crop_scale
        area = low + (high - low) * u[:, _U_SCALE]
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, _U_RATIO]
        ratio = torch.exp(log_ratio)
        # crop side as a fraction of the image side, clamped to the image
        fw = torch.sqrt(area * ratio * h / w).clamp(max=1.0)
        fh = torch.sqrt(area / ratio * w / h).clamp(max=1.0)
        cx = (1 - fw) * (2 * u[:, _U_CX] - 1)
        cy = (1 - fh) * (2 * u[:, _U_CY] - 1)
        flip = torch.where((u[:, _U_FLIP] < 0.5) & self.hflip, -1.0, 1.0)
        angle = torch.deg2rad((2 * u[:, _U_ANGLE] - 1) * ROTATION_DEGREES)
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
        brightness = 1 + (2 * u[:, _U_BRIGHT] - 1) * BRIGHTNESS
        contrast = 1 + (2 * u[:, _U_CONTRAST] - 1) * CONTRAST
        means = x.mean(dim=(-2, -1))
        gray_mean = brightness * (means[:, 0] if x.shape[1] == 1 else means @ torch.tensor(_LUMA))
        # brightness then contrast, fused: (x b) c + (1 - c) mean(x b), one pass over the pixels
        offset = ((1 - contrast) * gray_mean).view(per_image)
        x = torch.addcmul(offset, x, (brightness * contrast).view(per_image))
        if self.augment == "color":
            sat = 1 + (2 * u[:, _U_SAT] - 1) * SATURATION
            hue = (2 * u[:, _U_HUE] - 1) * HUE
            x = _mix_channels(hue_matrices(hue) @ saturation_matrices(sat), x)
        x = x.clamp_(0.0, 1.0)
        low, high = math.log(GAMMA[0]), math.log(GAMMA[1])
        gamma = torch.exp(low + (high - low) * u[:, _U_GAMMA])
        apply = u[:, _U_GAMMA_P] < 0.5
        if apply.any():  # only the images that drew a gamma pay for the power
            x[apply] = x[apply].pow(gamma[apply].view(-1, 1, 1, 1))
        if self.augment == "color":
            apply = u[:, _U_HED_P] < 0.5
            if apply.any():
                ab = (2 * u[:, _U_HED] - 1) * HED_SIGMA
                alpha, beta = 1 + ab[:, :3], ab[:, 3:]
                hed = rgb_to_hed(x[apply]) * alpha[apply].view(-1, 3, 1, 1) + beta[apply].view(-1, 3, 1, 1)
                x[apply] = hed_to_rgb(hed)
        return x
