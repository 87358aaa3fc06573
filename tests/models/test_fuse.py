"""``MedNet.fuse_for_inference``: the BN-folded copy computes the same function, on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import openmednet

MRI = "gray/pretrain/brain_tumor_mri/AugTraining/glioma/Tr-glTr_0002.jpg"
MRI_2 = "gray/pretrain/brain_tumor_mri/AugTraining/glioma/Tr-glTr_0003.jpg"


def _load_gray(path, size: int = 48) -> torch.Tensor:
    """A real MRI slice as ``(1, 1, size, size)`` normalised like ``mednet_gray`` (mean 0.5, std 0.25)."""
    img = Image.open(path).convert("L").resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return ((x - 0.5) / 0.25)[None, None]


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, as after training (a fresh BN folds to identity)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


@pytest.fixture()
def model_and_images(shared_data):
    torch.manual_seed(0)
    model = openmednet.create_model("mednet_test", num_classes=4).eval()
    _randomise_bn(model)
    x = torch.cat([_load_gray(shared_data / MRI), _load_gray(shared_data / MRI_2)])
    return model, x


def test_fused_matches_unfused_in_eval(model_and_images):
    model, x = model_and_images
    fused = model.fuse_for_inference()
    with torch.no_grad():
        ref, out = model(x), fused(x)
        ref_feats, out_feats = model.forward_features(x), fused.forward_features(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Features reach a few hundred after eight blocks with these BN statistics: float32 rounding
    # of the folded weights is then ~1e-6 of the largest value, so scale the tolerance to it.
    scale = ref_feats.abs().max().item()
    torch.testing.assert_close(out_feats, ref_feats, rtol=1e-5, atol=1e-5 * scale)
    # The check is meaningful: the two images give different logits.
    assert not torch.allclose(ref[0], ref[1], atol=1e-3)


def test_fused_is_exact_in_float64(model_and_images):
    """Folding is algebra, not an approximation: in float64 only ~1e-12 rounding remains."""
    model, x = model_and_images
    model = model.double()
    fused = model.fuse_for_inference()
    with torch.no_grad():
        ref, out = model.forward_features(x.double()), fused.forward_features(x.double())
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-9)


def test_fused_copy_folds_every_conv_bn_pair_and_leaves_original(model_and_images):
    model, _ = model_and_images
    keys_before = list(model.state_dict())
    fused = model.fuse_for_inference()
    assert list(model.state_dict()) == keys_before  # original layout untouched (weights stay loadable)
    n_bn = lambda m: sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    # 34 conv-BN-ReLU (2 stem + 32 branches) and 10 connection BNs folded; 8 block BNs remain.
    assert n_bn(model) == 34 + 10 + 8
    assert n_bn(fused) == 8
    assert sum(isinstance(x, nn.Conv2d) for x in fused.modules()) == 44
    assert not any(p.requires_grad for p in fused.parameters())


def test_fused_copy_refuses_training(model_and_images):
    fused = model_and_images[0].fuse_for_inference()
    with pytest.raises(ValueError, match="fused for inference"):
        fused.train()


def test_folding_refuses_train_mode_bn():
    model = openmednet.create_model("mednet_test").train()
    with pytest.raises(ValueError, match="eval mode"):
        model.stem.conv1.fold_bn_()
