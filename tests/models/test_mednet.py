"""MedNet architecture: the paper's counts, the model contract, and input validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import openmednet
from openmednet.models.mednet import CONNECTIONS, MedNet, count_convs, output_size


@pytest.mark.parametrize("name", ["mednet_gray", "mednet_color", "mednet_test"])
def test_paper_counts_44_convolutions_12_connections(name):
    model = openmednet.create_model(name)
    assert count_convs(model) == 44
    assert len(model.connections) == 12
    identity = [c for c in model.connections.values() if c.identity]
    assert len(identity) == 2
    conv_in_connections = sum(count_convs(c) for c in model.connections.values())
    assert conv_in_connections == 10
    assert len(model.blocks) == 8
    for block in model.blocks:
        assert [b.conv.kernel_size[0] for b in block.branches] == [1, 3, 5, 7]
    assert [m.conv.kernel_size[0] for m in model.stem] == [3, 5]
    assert [m.conv.stride[0] for m in model.stem] == [1, 2]


def test_connection_table_is_consistent():
    assert len(CONNECTIONS) == 12
    assert sum(c.kind == "long" for c in CONNECTIONS) == 4
    assert all(0 <= c.src < c.dst <= 8 for c in CONNECTIONS)
    assert len({(c.src, c.dst) for c in CONNECTIONS}) == 12


@pytest.mark.parametrize("size", [32, 33, 64, 97])
def test_any_input_from_32px(size):
    model = openmednet.create_model("mednet_test", num_classes=5).eval()
    x = torch.randn(2, 1, size, size + 3)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, output_size(size), output_size(size + 3))
    assert model(x).shape == (2, 5)


def test_every_parameter_gets_a_gradient_and_no_nans():
    torch.manual_seed(0)
    model = openmednet.create_model("mednet_test", num_classes=3)
    x = torch.randn(4, 1, 32, 32)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_eval_is_deterministic():
    model = openmednet.create_model("mednet_test", num_classes=3).eval()
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_reset_classifier_and_features():
    model = openmednet.create_model("mednet_test", num_classes=3).eval()
    x = torch.randn(2, 1, 32, 32)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, model.num_features)


def test_feature_info_matches_intermediates():
    model = openmednet.create_model("mednet_test").eval()
    x = torch.randn(1, 1, 64, 64)
    final, maps = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    assert len(maps) == len(model.feature_info) == 4
    assert [info["reduction"] for info in model.feature_info] == [2, 4, 8, 16]
    for fmap, info in zip(maps, model.feature_info):
        assert fmap.shape[1] == info["num_chs"]
        assert fmap.shape[-1] == -(-64 // info["reduction"])
        assert model.get_submodule(info["module"]) is not None


def test_width_multiplier_scales_params():
    small = openmednet.create_model("mednet_gray", width_mult=0.5)
    big = openmednet.create_model("mednet_gray", width_mult=1.0)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < n(big) / 2.5
    assert count_convs(small) == count_convs(big) == 44


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(1, 3, 64, 64), "1 input channel"),
        (torch.randn(1, 1, 16, 64), "smaller than MedNet.s minimum 17x17"),
        (torch.randn(1, 64, 64), r"\(B, C, H, W\)"),
        (torch.full((1, 1, 32, 32), float("nan")), "NaN"),
    ],
)
def test_bad_input_raises_clear_errors(x, match):
    model = openmednet.create_model("mednet_test").eval()
    with pytest.raises(ValueError, match=match):
        model(x)


def test_unknown_model_suggests_closest():
    with pytest.raises(KeyError, match="did you mean 'mednet_gray'"):
        openmednet.create_model("mednet_grey")


def test_model_args_rebuild_same_architecture():
    model = openmednet.create_model("mednet_test", num_classes=4)
    clone = MedNet(**model.model_args())
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 32, 32)
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))


@pytest.mark.parametrize("size, last", [(17, 2), (28, 2), (33, 3), (64, 4)])
def test_smallest_inputs_keep_a_2x2_last_map(size, last):
    # 17 px is the minimum (ceil(17/16) = 2); MedMNIST's native 28 px must run without upsampling.
    model = openmednet.create_model("mednet_test").eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 1, size, size + 5)).shape[-2:] == (last, math.ceil((size + 5) / 16))
