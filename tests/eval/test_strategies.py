"""Transfer strategies on mednet_test (and a timm ResNet for the generic path)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from openmednet import create_model
from openmednet.engine.optim import build_optimizer
from openmednet.eval.strategies import apply_strategy, head_prefix, layer_groups


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("mednet_test", num_classes=3)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_trains_everything() -> None:
    model = _model()
    apply_strategy(model, "full")
    assert _trainable(model) == {n for n, _ in model.named_parameters()}


def test_linear_probe_trains_only_the_head_and_freezes_bn_statistics() -> None:
    model = _model()
    info = apply_strategy(model, "linear_probe")
    assert _trainable(model) == {"head.fc1.weight", "head.fc1.bias", "head.fc.weight", "head.fc.bias"}
    assert info["trainable"] == sum(p.numel() for p in model.head.parameters())
    model.train()  # what any training loop calls
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    model(torch.rand(2, 1, 32, 32))
    assert bns and not any(m.training for m in bns)
    assert model.head.training
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bns, before))


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_freeze_k_freezes_exactly_stem_and_k_blocks(k: int) -> None:
    model = _model()
    apply_strategy(model, "freeze_k", k=k)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith("stem.")}
    for b in range(1, k + 1):
        expected |= {n for n, _ in model.named_parameters() if n.startswith(f"blocks.{b - 1}.")}
        expected |= {n for n, _ in model.named_parameters() if n.startswith("connections.") and n.split(".")[1].endswith(f"_{b}")}
    assert frozen == expected
    assert not any(n.startswith("head.") for n in frozen)
    with pytest.raises(ValueError, match="k must lie in"):
        apply_strategy(model, "freeze_k", k=9)


def test_layer_groups_cover_the_backbone_once() -> None:
    model = _model()
    groups = layer_groups(model)
    assert len(groups) == 9  # stem + 8 blocks
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters() if not n.startswith("head."))


def test_freeze_k_on_timm_resnet() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    apply_strategy(model, "freeze_k", k=2)
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1", "layer2"}


def test_meanvar_reproduces_per_layer_mean_and_std() -> None:
    model = _model()
    with torch.no_grad():  # a "pretrained" model with distinct per-layer statistics
        for i, p in enumerate(model.parameters()):
            p.normal_(0.01 * i, 0.02 + 0.001 * i)
    before = {n: (p.mean().item(), p.std().item(), p.detach().clone()) for n, p in model.named_parameters()}
    apply_strategy(model, "meanvar", seed=0)
    checked = 0
    for n, p in model.named_parameters():
        mean, std, old = before[n]
        if n.startswith("head."):
            assert torch.equal(p, old)
        elif p.numel() >= 500:
            assert not torch.equal(p, old)
            tol = 4 * std / p.numel() ** 0.5  # 4 standard errors of the sample mean
            assert abs(p.mean().item() - mean) < tol, n
            assert p.std().item() == pytest.approx(std, rel=0.15), n
            checked += 1
    assert checked > 20
    assert all(p.requires_grad for p in model.parameters())
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_head_gets_the_higher_learning_rate() -> None:
    model = _model()
    apply_strategy(model, "freeze_k", k=7)
    opt = build_optimizer(model, "adamw", lr=1e-3, head_prefixes=(head_prefix(model),), head_lr_mult=10)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["head_decay"] == pytest.approx(1e-2) and lrs["body_decay"] == pytest.approx(1e-3)
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_unknown_strategy() -> None:
    with pytest.raises(KeyError, match="did you mean 'linear_probe'"):
        apply_strategy(_model(), "linear_prob")
