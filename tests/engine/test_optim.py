"""Optimizer parameter groups and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

import openmednet
from openmednet.engine.optim import (
    build_optimizer,
    build_scheduler,
    param_groups,
    warmup_cosine,
)


def test_param_groups_skip_decay_on_bn_and_bias_and_scale_head_lr():
    model = openmednet.create_model("mednet_test", num_classes=3)
    opt = build_optimizer(model, "adamw", lr=0.01, weight_decay=0.1, head_prefixes=("head.",), head_lr_mult=10)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"body_decay", "body_no_decay", "head_decay", "head_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            assert (g["weight_decay"] == 0.0) == (p.ndim <= 1), n
            assert n.startswith("head.") == g["name"].startswith("head"), n
    assert by_name["head_decay"]["lr"] == pytest.approx(0.1)
    assert by_name["body_decay"]["lr"] == pytest.approx(0.01)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out():
    model = openmednet.create_model("mednet_test", num_classes=2)
    for p in model.stem.parameters():
        p.requires_grad_(False)
    groups = param_groups(model, 0.05)
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == n_trainable


def test_unknown_optimizer_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'adamw'"):
        build_optimizer(torch.nn.Linear(2, 2), "adamv")


def test_lars_adapts_decayed_weights_only():
    # lightly's LARS applies its trust ratio where weight_decay != 0: the conv/linear weights. The
    # no-decay group (BN, biases) takes a plain momentum-SGD step (first step: lr * grad).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    lr, wd = 0.1, 0.05
    opt = build_optimizer(model, "lars", lr=lr, weight_decay=wd)
    assert all("lars_exclude" not in g for g in opt.param_groups)  # no dead key lightly would ignore
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(8, 4)).square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n in ("1.weight", "1.bias", "0.bias"):
        torch.testing.assert_close(model.get_parameter(n), before[n] - lr * grads[n])
    w, g = before["0.weight"], grads["0.weight"]
    trust = 0.001 * w.norm() / (g.norm() + wd * w.norm() + 1e-8)
    torch.testing.assert_close(model[0].weight, w - lr * trust * (g + wd * w))


def test_lars_refuses_zero_weight_decay():
    with pytest.raises(ValueError, match="weight_decay > 0.*or use optimizer 'sgd'"):
        build_optimizer(torch.nn.Linear(4, 3), "lars", lr=0.1, weight_decay=0.0)


def test_warmup_cosine_values():
    total, warm = 110, 10
    assert warmup_cosine(0, total, warm) == pytest.approx(0.1)
    assert warmup_cosine(9, total, warm) == pytest.approx(1.0)
    assert warmup_cosine(10, total, warm) == pytest.approx(1.0)
    assert warmup_cosine(60, total, warm, 0.0) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine(110, total, warm, 0.01) == pytest.approx(0.01)


def test_scheduler_sets_every_group_per_step():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, "sgd", lr=0.4, head_prefixes=("bias",), head_lr_mult=2.0)
    sched = build_scheduler(opt, total_steps=8, warmup_steps=2, min_ratio=0.0)
    seen = []
    for step in range(8):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, lrs in enumerate(seen):
        f = (step + 1) / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 6))
        assert lrs == pytest.approx([0.4 * f, 0.8 * f]) or lrs == pytest.approx([0.8 * f, 0.4 * f])


def test_scheduler_rejects_empty_runs():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="total_steps must be > 0"):
        build_scheduler(opt, total_steps=0)
