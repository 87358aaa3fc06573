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

Randomness comes from torch's global generator only, so ``torch.manual_seed`` makes a pipeline
reproducible and DataLoader workers (seeded by torch per worker) draw independent streams.

Performance: every transform runs per image (in loader workers), because each image needs its own
random parameters and torchvision's v2 transforms draw one set per call. At 64 px a full pipeline
costs a few tenths of a millisecond per image (``benchmarks/bench_loader.py`` prints the cost of
each step and the loader's throughput against MedNet's training speed; results in
docs/benchmarks.md, "Loader"), so one core feeds training many times over. The costly steps were
fused or replaced where a cheaper exact-enough form exists (:class:`FastColorJitter`). At 224 px on
GPUs the per-image cost grows with the pixel count; batch-level augmentation on the GPU would be the
next step there (not needed, nor measured, on our CPU machines).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from openmednet._errors import look_up_option

__all__ = [
    "AUGMENTS",
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
    stains = torch.einsum("...chw,cd->...dhw", od, HED_FROM_RGB.to(rgb.dtype))
    return stains.clamp_min(0.0)


def hed_to_rgb(hed: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hed`, as ``skimage.color.hed2rgb`` computes it; output in [0, 1]."""
    log_rgb = torch.einsum("...chw,cd->...dhw", hed * _LOG_ADJUST, RGB_FROM_HED.to(hed.dtype))
    return torch.exp(log_rgb).clamp(0.0, 1.0)


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


def saturation_matrix(s: float) -> Tensor:
    """3x3 RGB matrix of a saturation change (W3C Filter Effects ``feColorMatrix type="saturate"``).

    ``s = 1`` is the identity, ``0`` gives luma gray, ``> 1`` over-saturates; gray stays gray.
    """
    luma = torch.tensor(_LUMA, dtype=torch.float32)
    return luma.expand(3, 3) * (1 - s) + torch.eye(3) * s


def hue_matrix(turns: float) -> Tensor:
    """3x3 RGB matrix rotating hue by ``turns`` of a full circle about the gray axis.

    The W3C Filter Effects ``feColorMatrix type="hueRotate"`` matrix: linear, so it costs one small
    matrix product instead of torchvision's RGB -> HSV -> RGB round trip (the slowest step of the
    colour pipeline before this). It keeps gray pixels gray and approximates an HSV hue shift.
    """
    angle = 2 * math.pi * turns
    c, s = math.cos(angle), math.sin(angle)
    lr, lg, lb = _LUMA
    return torch.tensor(
        [
            [lr + c * (1 - lr) - s * lr, lg - c * lg - s * lg, lb - c * lb + s * (1 - lb)],
            [lr - c * lr + s * 0.143, lg + c * (1 - lg) + s * 0.140, lb - c * lb - s * 0.283],
            [lr - c * lr - s * (1 - lr), lg - c * lg + s * lg, lb + c * (1 - lb) + s * lb],
        ],
        dtype=torch.float32,
    )


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
) -> v2.Compose:
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

    Returns:
        A callable mapping a uint8 ``(C_in, H, W)`` tensor to a float32 ``(channels, image_size,
        image_size)`` tensor normalised with the contract's mean and std.

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
