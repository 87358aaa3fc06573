"""``BatchAugment`` against its oracle: the per-image pipeline of torchvision's transforms
(tests/data/augment_reference.py). Same parameter distributions, and, for given parameters, the
same operations as torchvision's functional ops (or the per-image colour ops where the batched
augmentation deliberately differs from torchvision: Rec. 709 luma, linear hue rotation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from augment_reference import reference_pipeline
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from openmednet.data.transforms import (
    CROP_RATIO,
    GAMMA_P,
    HED_P,
    HFLIP_P,
    BatchAugment,
    build_transform,
    color_jitter,
)

GRAY_CFG = {"input_size": (1, 64, 64), "mean": (0.0,), "std": (1.0,)}
COLOR_CFG = {"input_size": (3, 64, 64), "mean": (0.0,), "std": (1.0,)}
N = 20000


@pytest.fixture(scope="module")
def drawn() -> dict[str, torch.Tensor]:
    """``BatchAugment.params`` of N draws of the colour augmentation (global generator, seeded)."""
    augment = build_transform(COLOR_CFG, train=True)
    torch.manual_seed(0)
    return augment.params(augment.draw(N, None))


def _reference_draws(transform: v2.Transform, key: str) -> np.ndarray:
    torch.manual_seed(1)
    return np.array([np.asarray(transform.make_params([])[key], dtype=np.float64) for _ in range(N)])


def _steps(augment: str) -> dict[type, v2.Transform]:
    return {type(t): t for t in reference_pipeline(COLOR_CFG, augment=augment).transforms}


def _same_distribution(ours: torch.Tensor, reference: np.ndarray) -> None:
    # Two-sample Kolmogorov-Smirnov at N = 20000 each: 0.02 is about the 0.1 % critical value.
    statistic = stats.ks_2samp(ours.double().numpy().ravel(), reference.ravel()).statistic
    assert statistic < 0.02, f"KS statistic {statistic:.4f}"


def test_rotation_is_torchvisions(drawn):
    _same_distribution(drawn["angle"], _reference_draws(_steps("gray")[v2.RandomRotation], "angle"))


def test_photometric_factors_are_the_per_image_transforms(drawn):
    from openmednet.data.transforms import FastColorJitter, HEDJitter, RandomGamma

    steps = _steps("color")
    for key in ("brightness", "contrast", "saturation", "hue"):
        _same_distribution(drawn[key], _reference_draws(steps[FastColorJitter], key))
    always = RandomGamma(gamma_range=(math.exp(steps[RandomGamma].log_range[0]), math.exp(steps[RandomGamma].log_range[1])), p=1.0)
    _same_distribution(drawn["gamma"], _reference_draws(always, "gamma"))
    hed = HEDJitter(steps[HEDJitter].sigma, p=1.0)
    _same_distribution(drawn["hed_alpha"], _reference_draws(hed, "alpha"))
    _same_distribution(drawn["hed_beta"], _reference_draws(hed, "beta"))


def test_probabilities_match_the_reference(drawn):
    steps = _steps("color")
    assert steps[v2.RandomHorizontalFlip].p == HFLIP_P
    for key, p in (("flip", HFLIP_P), ("apply_gamma", GAMMA_P), ("apply_hed", HED_P)):
        assert abs(drawn[key].float().mean().item() - p) < 0.015, key


def test_crop_proposals_are_torchvisions_and_stay_in_range(drawn):
    # RandomResizedCrop proposes area ~ U(scale), log(ratio) ~ U(log ratio range), and re-draws
    # proposals that do not fit; BatchAugment clamps them to the image instead (class docstring).
    crop = _steps("gray")[v2.RandomResizedCrop]
    assert tuple(crop.ratio) == CROP_RATIO
    low, high = crop.scale
    assert stats.kstest(((drawn["area"] - low) / (high - low)).numpy(), "uniform").statistic < 0.015
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    assert stats.kstest(((drawn["ratio"].log() - log_low) / (log_high - log_low)).numpy(), "uniform").statistic < 0.015


def _draws(**params: float) -> torch.Tensor:
    """One row of uniforms: full square centred crop, no flip, no rotation, unit factors, no
    gamma or HED, except for the given parameters (set through the inverse of their mapping)."""
    u = torch.full((1, 19), 0.5)
    u[:, 4] = u[:, 10] = u[:, 12] = 0.9
    if "area" in params:
        u[:, 0] = (params["area"] - 0.5) / 0.5  # crop_scale (0.5, 1)
    if "angle" in params:
        u[:, 5] = (params["angle"] / 10 + 1) / 2
    for i, key in ((6, "brightness"), (7, "contrast"), (8, "saturation")):
        if key in params:
            u[:, i] = ((params[key] - 1) / 0.2 + 1) / 2
    if "hue" in params:
        u[:, 9] = (params["hue"] / 0.05 + 1) / 2
    if "gamma" in params:
        u[:, 10] = 0.1
        u[:, 11] = (math.log(params["gamma"]) - math.log(0.8)) / (math.log(1.25) - math.log(0.8))
    return u


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A smooth (1, 64, 64) float image in [0.1, 0.7]: interpolation errors stay small."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    return (0.4 + 0.3 * torch.sin(3 * xx) * torch.cos(2 * yy))[None, None]


def test_crop_is_torchvisions_resized_crop(image):
    augment = BatchAugment(channels=1, image_size=64, mean=(0.0,), std=(1.0,), augment="gray")
    u = _draws(area=0.5625)  # a centred 48 x 48 crop, resampled to 64
    ours = augment._geometry(image, u)
    reference = F.resized_crop(image, 8, 8, 48, 48, [64, 64], antialias=False)
    # The outermost output pixels interpolate with image pixels just outside the crop here, while
    # torchvision's crop-then-resize repeats the crop's edge.
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(ours[inner], reference[inner], rtol=0, atol=1e-5)


def test_rotation_is_torchvisions_rotate(image):
    augment = BatchAugment(channels=1, image_size=64, mean=(0.0,), std=(1.0,), augment="gray", crop_scale=(1.0, 1.0))
    ours = augment._geometry(image, _draws(angle=7.0))
    # Same angle convention (counter-clockwise). Corners differ: torchvision fills them with zeros,
    # the full-image crop here with zeros too but the border pixels interpolate differently.
    reference = F.rotate(image, 7.0, interpolation=v2.InterpolationMode.BILINEAR)
    inner = (slice(None), slice(None), slice(12, 52), slice(12, 52))
    torch.testing.assert_close(ours[inner], reference[inner], rtol=0, atol=1e-5)


def test_gray_photometric_is_torchvisions_brightness_contrast_gamma(image):
    augment = BatchAugment(channels=1, image_size=64, mean=(0.0,), std=(1.0,), augment="gray")
    u = _draws(brightness=0.9, contrast=1.15, gamma=1.2)
    reference = F.adjust_gamma(F.adjust_contrast(F.adjust_brightness(image, 0.9), 1.15), 1.2)
    torch.testing.assert_close(augment._photometric(image.clone(), u), reference, rtol=0, atol=1e-5)


def test_colour_photometric_is_the_per_image_colour_jitter():
    torch.manual_seed(0)
    rgb = torch.rand(1, 3, 32, 32) * 0.8 + 0.1
    augment = BatchAugment(channels=3, image_size=32, mean=(0.0,), std=(1.0,), augment="color")
    u = _draws(brightness=1.1, contrast=0.85, saturation=1.15, hue=-0.03)
    reference = color_jitter(rgb[0], 1.1, 0.85, 1.15, -0.03)
    torch.testing.assert_close(augment._photometric(rgb.clone(), u)[0], reference, rtol=0, atol=1e-5)
