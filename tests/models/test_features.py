"""``create_model(name, features_only=True, out_indices=...)``: timm's feature-extraction contract.

Exact checks: the shapes and channels of every level for the registered MedNet variants, maps
bit-equal to the classifier's activations with the same weights (forward hooks on the modules
``feature_info`` names), weights bit-equal to the shipped ones, pruning of unused blocks, and the
timm baselines through timm's own wrappers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import openmednet
from openmednet.models import MedNetFeatures
from openmednet.models._features import EXTRA_LEVEL_MODULE
from openmednet.models._weights import load_weights

# Block output channels at width 1 (docs/architecture.md): stages end on blocks 2, 4, 6, 8.
WIDTH1_STAGE_CHS = (64, 96, 192, 448)


def _stage_chs(width_mult: float) -> list[int]:
    """Expected stage channels from ``CONNECTIONS``: block 2 joins the stem unchanged (identity),
    blocks 4 and 6 get two ``w/4`` connections, block 8 three; widths round to multiples of 8."""
    from openmednet.models.mednet import make_divisible

    stem = make_divisible(32 * width_mult)
    w1, w2, w3, w4 = (make_divisible(w * width_mult) for w in (32, 64, 128, 256))
    return [w1 + stem, w2 + 2 * (w2 // 4), w3 + 2 * (w3 // 4), w4 + 3 * (w4 // 4)]


def _activations(model: torch.nn.Module, modules: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of ``modules`` during one classifier forward (hooks: the classifier's own activations)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
        for name in modules
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return [seen[name] for name in modules]


def test_width1_stage_channels_match_the_architecture_table():
    assert _stage_chs(1.0) == list(WIDTH1_STAGE_CHS)


@pytest.mark.parametrize("name, in_chans, width", [("mednet_gray", 1, 1.0), ("mednet_color", 3, 1.0), ("mednet_test", 1, 0.25)])
@pytest.mark.parametrize("size", [64, 65])
def test_shapes_and_channels_per_level(name, in_chans, width, size):
    features = openmednet.create_model(name, features_only=True, out_indices=(0, 1, 2, 3, 4)).eval()
    chs = _stage_chs(width)
    assert isinstance(features, MedNetFeatures)
    assert features.feature_info.channels() == chs + chs[-1:]
    assert features.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert features.feature_info.module_name() == ["blocks.1", "blocks.3", "blocks.5", "blocks.7", EXTRA_LEVEL_MODULE]
    with torch.no_grad():
        maps = features(torch.randn(2, in_chans, size, size))
    expected = [(2, c, math.ceil(size / r), math.ceil(size / r)) for c, r in zip(chs + chs[-1:], (2, 4, 8, 16, 32))]
    assert [tuple(m.shape) for m in maps] == expected


def test_default_levels_are_the_four_stages_and_output_stride_16_keeps_stage4():
    features = openmednet.create_model("mednet_test", features_only=True)
    assert features.out_indices == (0, 1, 2, 3)
    assert features.feature_info.reduction() == [2, 4, 8, 16]
    assert not hasattr(features, EXTRA_LEVEL_MODULE)
    os16 = openmednet.create_model("mednet_test", features_only=True, out_indices=(3, 4), output_stride=16).eval()
    assert os16.feature_info.reduction() == [16, 16]
    with torch.no_grad():
        stage4, level4 = os16(torch.randn(1, 1, 64, 64))
    assert torch.equal(stage4, level4)


@pytest.mark.parametrize("size", [64, 96, 65])
def test_features_equal_the_classifier_activations_with_the_same_weights(size):
    torch.manual_seed(0)
    classifier = openmednet.create_model("mednet_test", num_classes=3)
    classifier.train()
    for _ in range(2):  # non-trivial BatchNorm statistics, then compare in eval mode
        classifier(torch.randn(4, 1, size, size))
    classifier.eval()
    features = openmednet.create_model("mednet_test", features_only=True, out_indices=(0, 1, 2, 3, 4)).eval()
    missing, unexpected = features.load_state_dict(classifier.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("head.") for k in unexpected)

    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        maps = features(x)
        expected = _activations(classifier, ["blocks.1", "blocks.3", "blocks.5", "blocks.7"], x)
        final, intermediates = classifier.forward_intermediates(x)
    for got, want, inter in zip(maps[:4], expected, intermediates, strict=True):
        assert torch.equal(got, want) and torch.equal(inter, want)
    assert torch.equal(final, expected[-1])
    pooled = F.avg_pool2d(expected[-1], 2, 2, ceil_mode=True, count_include_pad=False)
    assert torch.equal(maps[4], pooled)


def test_shipped_weights_load_bit_identically_into_the_features():
    features = openmednet.create_model("mednet_gray", pretrained=True, features_only=True)
    cfg = openmednet.get_pretrained_cfg("mednet_gray")
    shipped = load_weights(cfg.file, sha256=cfg.sha256)
    state = features.state_dict()
    assert set(state) == {k for k in shipped if not k.startswith("head.")}
    assert all(torch.equal(state[k], shipped[k]) for k in state)
    assert features.pretrained_cfg.num_classes == 0
    assert features.pretrained_cfg.sha256 == cfg.sha256  # the input contract travels with the weights


def test_unused_blocks_are_pruned_and_every_parameter_gets_a_gradient():
    shallow = openmednet.create_model("mednet_test", features_only=True, out_indices=(0, 1))
    assert len(shallow.blocks) == 4
    assert all(int(k.split("_")[1]) <= 4 for k in shallow.connections)
    for features in (shallow, openmednet.create_model("mednet_test", features_only=True, out_indices=(0, 1, 2, 3, 4))):
        maps = features(torch.randn(2, 1, 64, 64))
        sum(m.square().mean() for m in maps).backward()
        assert all(p.grad is not None for p in features.parameters())  # DDP: no unused parameters


def test_negative_and_single_indices_follow_timm():
    features = openmednet.create_model("mednet_test", features_only=True, out_indices=(-2, -1))
    assert features.out_indices == (3, 4)
    model = openmednet.create_model("mednet_test").eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        final, early = model.forward_intermediates(x, indices=[0], stop_early=True)
    assert [m.shape[1] for m in last_two] == [info["num_chs"] for info in model.feature_info[2:]]
    assert torch.equal(final, early[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(features_only=True, out_indices=(5,)), "out of range|must be in"),
        (dict(features_only=True, out_indices=(2, 1)), "increasing"),
        (dict(features_only=True, output_stride=8), "output_stride 32 or 16"),
        (dict(out_indices=(0, 1)), "features_only=True"),
    ],
)
def test_bad_feature_arguments_say_what_to_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        openmednet.create_model("mednet_test", **kwargs)


def test_features_keep_the_input_contract():
    features = openmednet.create_model("mednet_test", features_only=True)
    with pytest.raises(ValueError, match="1 input channel"):
        features(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="smaller than MedNet's minimum"):
        features(torch.randn(1, 1, 16, 64))


def test_timm_baseline_features_carry_the_classifier_weights():
    torch.manual_seed(0)
    classifier = openmednet.create_model("resnet18", in_chans=1, num_classes=2).eval()
    features = openmednet.create_model("resnet18", in_chans=1, features_only=True, out_indices=(1, 2, 3, 4))
    features.load_state_dict({k: v for k, v in classifier.state_dict().items() if not k.startswith("fc.")})
    features.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        maps = features(x)
        expected = _activations(classifier, features.feature_info.module_name(), x)
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [m.shape[1] for m in maps] == features.feature_info.channels() == [64, 128, 256, 512]
    assert all(torch.equal(a, b) for a, b in zip(maps, expected, strict=True))


def test_efficientnet_lite0_features_hold_the_offline_imagenet_weights():
    classifier = openmednet.create_model("efficientnet_lite0", pretrained=True, in_chans=1)
    features = openmednet.create_model("efficientnet_lite0", pretrained=True, in_chans=1, features_only=True)
    reference = classifier.state_dict()
    state = features.state_dict()
    assert state and all(torch.equal(v, reference[k]) for k, v in state.items())
    assert features.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert features.pretrained_cfg.num_classes == 0
