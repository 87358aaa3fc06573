"""Transforms on real images: exact eval values, gray stays gray, hue moves, HED matches skimage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_corpus import load_square
from torchvision.transforms import v2

from openmednet.data.transforms import (
    RGB_FROM_HED,
    BatchAugment,
    FastColorJitter,
    RandomGamma,
    build_multiview_transform,
    build_transform,
    color_jitter,
    hed_jitter,
    hed_to_rgb,
    hue_matrix,
    rgb_to_hed,
)

GRAY_CFG = {"input_size": (1, 64, 64), "mean": (0.5,), "std": (0.25,)}
COLOR_CFG = {"input_size": (3, 64, 64), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.fixture(scope="module")
def mri(shared_data) -> torch.Tensor:
    """A real brain MRI slice, (1, 64, 64) uint8."""
    path = shared_data / "gray/pretrain/brain_tumor_mri/AugTraining/glioma/Tr-glTr_0002.jpg"
    return torch.from_numpy(load_square(path, 64, 1))


@pytest.fixture(scope="module")
def histology(shared_data) -> torch.Tensor:
    """A real H&E lung tile, (3, 64, 64) uint8."""
    folder = shared_data / "color/pretrain/lc25000_lung"
    path = sorted(folder.rglob("*.jp*g"))[0]
    return torch.from_numpy(load_square(path, 64, 3))


def test_eval_transform_gives_exact_normalised_values(mri):
    out = build_transform(GRAY_CFG, train=False)(mri)
    expected = (mri.float() / 255 - 0.5) / 0.25
    assert out.dtype == torch.float32 and out.shape == (1, 64, 64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_eval_transform_centre_crops_non_square(shared_data):
    path = shared_data / "gray/pretrain/brain_tumor_mri/AugTraining/glioma/Tr-glTr_0003.jpg"
    wide = torch.from_numpy(load_square(path, 96, 1))[:, 16:80, :]  # (1, 64, 96)
    out = build_transform(GRAY_CFG, train=False)(wide)
    torch.testing.assert_close(out, (wide[:, :, 16:80].float() / 255 - 0.5) / 0.25, rtol=0, atol=1e-6)


def test_eval_transform_converts_channels(mri, histology):
    to_rgb = build_transform(COLOR_CFG, train=False)(mri)
    for c, (m, s) in enumerate(zip(COLOR_CFG["mean"], COLOR_CFG["std"])):
        torch.testing.assert_close(to_rgb[c], (mri[0].float() / 255 - m) / s, rtol=0, atol=1e-5)
    to_gray = build_transform(GRAY_CFG, train=False)(histology)
    luma = v2.functional.rgb_to_grayscale(histology)
    torch.testing.assert_close(to_gray, (luma.float() / 255 - 0.5) / 0.25, rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_gray_augmentation_keeps_channels_and_invents_no_colour(mri, channels):
    transform = build_transform(GRAY_CFG, train=True, channels=channels, augment="gray")
    for seed in range(8):
        torch.manual_seed(seed)
        out = transform(mri)
        assert out.shape == (channels, 64, 64)
        assert torch.isfinite(out).all()
        if channels == 3:  # the gray plane replicated: all three must stay identical
            assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_gray_augmentation_changes_the_image(mri):
    torch.manual_seed(0)
    out = build_transform(GRAY_CFG, train=True)(mri)
    reference = build_transform(GRAY_CFG, train=False)(mri)
    assert (out - reference).abs().mean() > 0.05


def test_colour_jitter_moves_hue_and_keeps_gray_gray(histology):
    skimage_color = pytest.importorskip("skimage.color")
    rgb = histology.float() / 255
    shifted = color_jitter(rgb, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.1)
    hsv_before = skimage_color.rgb2hsv(rgb.permute(1, 2, 0).numpy())
    hsv_after = skimage_color.rgb2hsv(shifted.permute(1, 2, 0).numpy())
    vivid = (hsv_before[..., 1] > 0.2) & (hsv_after[..., 1] > 0.2)
    assert vivid.mean() > 0.3  # H&E tiles are colourful
    diff = (hsv_after[..., 0] - hsv_before[..., 0] + 0.5) % 1.0 - 0.5  # circular, in turns
    assert abs(np.median(diff[vivid]) - 0.1) < 0.03
    # rows of the hue matrix sum to 1: gray pixels are fixed points
    torch.testing.assert_close(hue_matrix(0.3).sum(dim=1), torch.ones(3))
    gray = torch.full((3, 4, 4), 0.4)
    torch.testing.assert_close(color_jitter(gray, 1.0, 1.0, 1.5, 0.2), gray)


def test_fast_colour_jitter_identity_at_zero_strength(histology):
    rgb = histology.float() / 255
    torch.testing.assert_close(FastColorJitter()(rgb), rgb)


def test_random_gamma_is_exact_power(mri):
    x = mri.float() / 255
    torch.testing.assert_close(RandomGamma((1.2, 1.2), p=1.0)(x), x.pow(1.2))


def test_hed_matches_skimage(histology):
    skimage_color = pytest.importorskip("skimage.color")
    np.testing.assert_array_equal(RGB_FROM_HED.numpy(), skimage_color.rgb_from_hed)
    rgb64 = histology.double() / 255
    hed = rgb_to_hed(rgb64)
    expected = skimage_color.rgb2hed(rgb64.permute(1, 2, 0).numpy())
    np.testing.assert_allclose(hed.permute(1, 2, 0).numpy(), expected, atol=1e-12)
    back = hed_to_rgb(hed)
    np.testing.assert_allclose(back.permute(1, 2, 0).numpy(), skimage_color.hed2rgb(expected), atol=1e-12)
    # the perturbation is skimage's round trip with scaled/shifted stains (Tellez et al. 2018)
    alpha, beta = torch.tensor([1.05, 0.95, 1.0]), torch.tensor([0.02, -0.01, 0.0])
    jittered = hed_jitter(rgb64, alpha, beta)
    stains = expected * alpha.double().numpy() + beta.double().numpy()
    np.testing.assert_allclose(jittered.permute(1, 2, 0).numpy(), skimage_color.hed2rgb(stains), atol=1e-12)
    assert (jittered - back).abs().max() > 0.01


def test_colour_augmentation_is_deterministic_under_a_seed(histology):
    transform = build_transform(COLOR_CFG, train=True)
    torch.manual_seed(7)
    first = transform(histology)
    torch.manual_seed(7)
    second = transform(histology)
    torch.manual_seed(8)
    third = transform(histology)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_multiview_gives_independent_views(histology):
    torch.manual_seed(0)
    views = build_multiview_transform(COLOR_CFG, views=2, crop_scale=(0.2, 1.0))(histology)
    assert len(views) == 2 and views[0].shape == views[1].shape == (3, 64, 64)
    assert not torch.equal(views[0], views[1])


def test_hflip_can_be_disabled(mri):
    # with the same seeds, outputs differ exactly where a flip was drawn
    seeds = list(range(16))
    images = mri[None].expand(16, -1, -1, -1)
    flipping, fixed = build_transform(GRAY_CFG, train=True), build_transform(GRAY_CFG, train=True, hflip=False)
    assert not fixed.params(fixed.draw(16, seeds))["flip"].any()
    drawn_flip = (flipping.draw(16, seeds)[:, 4] < 0.5).tolist()
    same = [torch.equal(a, b) for a, b in zip(flipping.batch(images, seeds), fixed.batch(images, seeds))]
    assert same == [not f for f in drawn_flip] and 0 < sum(drawn_flip) < 16


def _identity_draws(n: int, flip: bool) -> torch.Tensor:
    """Uniforms giving a full, square, unrotated crop (and unit photometric factors)."""
    u = torch.full((n, 19), 0.5)
    u[:, 4] = 0.1 if flip else 0.9  # flip drawn when < 0.5
    u[:, 10] = u[:, 12] = 0.9  # gamma and HED not applied
    return u


@pytest.mark.parametrize("flip", [False, True])
def test_batch_geometry_is_exact_for_the_identity_crop(mri, flip):
    augment = BatchAugment(channels=1, image_size=64, mean=(0.0,), std=(1.0,), augment="gray", crop_scale=(1.0, 1.0))
    x = mri[None].float() / 255
    out = augment._geometry(x, _identity_draws(1, flip))
    torch.testing.assert_close(out, x.flip(-1) if flip else x, rtol=0, atol=1e-5)


def test_batch_augment_per_image_equals_batch_and_depends_only_on_seed(mri, histology):
    gray = build_transform(GRAY_CFG, train=True)
    color = build_transform(COLOR_CFG, train=True)
    assert isinstance(gray, BatchAugment) and isinstance(color, BatchAugment)
    for augment, image in ((gray, mri), (color, histology)):
        images = torch.stack([image, image.flip(-2), image.flip(-1)])
        out = augment.batch(images, [11, 22, 33])
        assert out.shape == (3, image.shape[0], 64, 64) and out.dtype == torch.float32
        alone = augment.batch(images[1:2], [22])[0]
        torch.testing.assert_close(out[1], alone, rtol=0, atol=1e-5)
        assert not torch.equal(out[1], augment.batch(images[1:2], [23])[0])


def test_batch_gray_augment_invents_no_colour(mri):
    augment = build_transform(GRAY_CFG, train=True, channels=3, augment="gray")
    out = augment.batch(mri[None].expand(8, -1, -1, -1), list(range(8)))
    assert out.shape == (8, 3, 64, 64)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_batch_colour_augment_applies_hed_like_the_per_image_function(histology):
    augment = build_transform({**COLOR_CFG, "mean": (0.0,), "std": (1.0,)}, train=True, crop_scale=(1.0, 1.0))
    u = _identity_draws(1, flip=False)
    u[:, 12] = 0.1  # HED applied
    u[:, 13:19] = torch.tensor([0.9, 0.2, 0.5, 0.7, 0.3, 0.5])
    x = histology[None].float() / 255
    out = augment._photometric(augment._geometry(x, u), u)
    ab = (2 * u[0, 13:19] - 1) * 0.05
    expected = hed_jitter(x[0], 1 + ab[:3], ab[3:])
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-5)


def test_errors_say_what_to_do(mri):
    with pytest.raises(ValueError, match="uint8 tensor"):
        build_transform(GRAY_CFG, train=False)(mri.numpy())
    with pytest.raises(ValueError, match="uint8 tensor"):
        build_transform(GRAY_CFG, train=False)(mri.float())
    with pytest.raises(ValueError, match="augment='gray'"):
        build_transform(GRAY_CFG, train=True, augment="color")
    with pytest.raises(ValueError, match="expected 1 or 3"):
        build_transform({**COLOR_CFG, "mean": (0.1, 0.2)}, train=False)
    with pytest.raises(KeyError, match="input_size"):
        build_transform({"mean": (0.5,), "std": (0.25,)}, train=False)
    with pytest.raises(KeyError, match="did you mean 'bicubic'"):
        build_transform({**GRAY_CFG, "interpolation": "bicubc"}, train=False)
