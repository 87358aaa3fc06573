"""``MedNet.set_branch_merge``: merged branch convs compute the same network, on real pixels.

The merged path (one zero-padded 7x7 conv, one ``batch_norm``) must give the separate branches'
outputs and gradients, update every branch BN's running statistics and counter as
``nn.BatchNorm2d`` would, and leave the ``state_dict`` alone. Exactness is checked in float64
(``rtol=1e-7, atol=1e-10``: the two paths differ only in summation order); the channels_last,
fuse and feature checks run in float32 (``rtol=1e-4, atol=1e-5``), and bf16 autocast is only
checked to run (it is emulated, hence slow, on AVX2-only CPUs).
"""

from __future__ import annotations

import copy
import importlib.resources

import numpy as np
import pytest
import torch
from torch import nn

import openmednet
from openmednet.models._features import to_features
from openmednet.models.mednet import ALL_BRANCHES, PAIRED_BRANCHES

# The embedded demo sample (PneumoniaMNIST, CC BY 4.0), read directly: no quickstart import needed.
DEMO = importlib.resources.files("openmednet") / "assets" / "demo" / "pneumoniamnist_demo.npz"
F64 = {"rtol": 1e-7, "atol": 1e-10}
F32 = {"rtol": 1e-4, "atol": 1e-5}
ALL_STAGES = (1, 2, 3, 4)
MODELS = [("mednet_test", {}), ("mednet_gray", {"width_mult": 0.5})]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """4 real chest X-rays from the embedded demo sample, ``(4, 1, 28, 28)``, normalised as ``mednet_gray``.

    28 px gives a 2x2 last map, so every BatchNorm sees 16 values per channel."""
    pixels = np.load(str(DEMO))["train_images"][:4]
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)[:, None]
    return (x - 0.5) / 0.25


def _pair(name: str, kwargs: dict, stages=ALL_STAGES, dtype=torch.float64,
          groups=ALL_BRANCHES) -> tuple[nn.Module, nn.Module]:
    """The same weights twice: branches separate, and merged in ``stages`` (dropout off for exact steps)."""
    torch.manual_seed(0)
    separate = openmednet.create_model(name, num_classes=3, drop_rate=0.0, **kwargs).to(dtype)
    return separate, copy.deepcopy(separate).set_branch_merge(stages, groups)


def _branch_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [branch.bn for block in model.blocks for branch in block.branches]


def _train_steps(models, x: torch.Tensor, steps: int = 2, tol=F64) -> None:
    """``steps`` SGD steps of each model on ``x``, checking outputs and every gradient agree each step."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    for _ in range(steps):
        outs = []
        for model, opt in zip(models, opts):
            model.train()
            opt.zero_grad()
            out = model(x)
            out.square().sum().backward()
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], **tol)
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(q.grad, p.grad, **tol, msg=lambda m, name=name: f"gradient of {name}: {m}")
        for opt in opts:
            opt.step()


@pytest.mark.parametrize("groups", [ALL_BRANCHES, PAIRED_BRANCHES, ((1,), (3, 5), (7,))], ids=["all", "paired", "middle"])
@pytest.mark.parametrize("name,kwargs", MODELS)
def test_merged_train_steps_match_separate(images, name, kwargs, groups):
    """Every stage merged (strides 1 and 2): outputs, gradients and BN statistics over two steps."""
    separate, merged = _pair(name, kwargs, groups=groups)
    _train_steps((separate, merged), images.double())
    for (key, a), b in zip(separate.state_dict().items(), merged.state_dict().values()):
        if key.endswith("num_batches_tracked"):
            assert torch.equal(a, b) and a.item() == 2, key
        else:
            torch.testing.assert_close(b, a, **F64, msg=lambda m, key=key: f"{key}: {m}")
    separate.eval(), merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(images.double()), separate(images.double()), **F64)


def test_eval_mode_uses_running_statistics(images):
    """After training, eval outputs agree and do not touch the (non-trivial) running statistics."""
    separate, merged = _pair("mednet_test", {})
    _train_steps((separate, merged), images.double(), steps=1)
    before = copy.deepcopy(merged.state_dict())
    separate.eval(), merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(images.double()), separate(images.double()), **F64)
    for key, value in merged.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_cumulative_average_momentum_none(images):
    """``momentum=None`` (cumulative average over ``num_batches_tracked``) is followed too."""
    separate, merged = _pair("mednet_test", {})
    for bn in _branch_bns(separate) + _branch_bns(merged):
        bn.momentum = None
    _train_steps((separate, merged), images.double(), steps=2)
    for a, b in zip(_branch_bns(separate), _branch_bns(merged)):
        torch.testing.assert_close(b.running_mean, a.running_mean, **F64)
        torch.testing.assert_close(b.running_var, a.running_var, **F64)
        assert b.num_batches_tracked.item() == a.num_batches_tracked.item() == 2


def test_branch_bns_that_differ_are_refused(images):
    _, merged = _pair("mednet_test", {})
    merged.blocks[0].branches[2].bn.momentum = 0.3
    with pytest.raises(ValueError, match="must share mode, eps, momentum"):
        merged(images.double())


@pytest.mark.parametrize("name,kwargs", MODELS)
def test_state_dict_layout_unchanged(name, kwargs):
    separate, merged = _pair(name, kwargs)
    assert [(k, v.shape) for k, v in merged.state_dict().items()] == [
        (k, v.shape) for k, v in separate.state_dict().items()
    ]
    assert merged.model_args() == separate.model_args()
    merged.load_state_dict(separate.state_dict())  # strict: the same keys both ways
    assert merged.branch_merge_stages == ALL_STAGES


def test_stage_selection_and_errors():
    model = openmednet.create_model("mednet_test")
    assert model.branch_merge_stages == ()
    model.set_branch_merge((1,))
    assert model.branch_merge_stages == (1,)
    assert [b.merge_branches for b in model.blocks] == [True, True] + [False] * 6
    assert model.set_branch_merge(()).branch_merge_stages == ()
    with pytest.raises(ValueError, match="stages are 1..4"):
        model.set_branch_merge((0,))
    with pytest.raises(ValueError, match="stages are 1..4"):
        model.set_branch_merge((5,))
    with pytest.raises(TypeError, match=r"e.g. \(1,\)"):
        model.set_branch_merge(1)


def test_groups_selection_and_errors():
    """Groups are kept per block; groups that would reorder or drop channels are refused."""
    model = openmednet.create_model("mednet_test").set_branch_merge((2,), [[1, 3], [5, 7]])
    assert [b.merge_groups for b in model.blocks] == [()] * 2 + [PAIRED_BRANCHES] * 2 + [()] * 4
    assert model.branch_merge_stages == (2,)
    for bad in ([[1, 5], [3, 7]], [[1, 3], [5]], [[1, 3, 5, 7, 9]], [[1, 3], [], [5, 7]], [], [1, 3, 5, 7]):
        with pytest.raises(ValueError, match="branch groups"):
            model.set_branch_merge((1,), bad)
    assert [b.merge_groups for b in model.blocks][2] == PAIRED_BRANCHES  # a refused call changes nothing
    block = model.blocks[0]
    block.merge_branches = True
    assert block.merge_groups == ALL_BRANCHES
    block.merge_branches = False
    assert block.merge_groups == ()


def test_pretrain_config_turns_it_on():
    """``model.branch_merge`` in the pre-training config reaches the backbone (an execution option only)."""
    from openmednet.config import load_config
    from openmednet.engine.pretrain import ModelSection, PretrainConfig, build_backbone

    backbone = build_backbone(PretrainConfig(model=ModelSection(name="mednet_test", branch_merge=(1,))), channels=1)
    assert backbone.branch_merge_stages == (1,)
    assert backbone.blocks[0].merge_groups == ALL_BRANCHES
    cfg = load_config(PretrainConfig, overrides=["model.name=mednet_test", "model.branch_merge=[1,2]",
                                                 "model.branch_merge_groups=[[1,3],[5,7]]"])
    backbone = build_backbone(cfg, channels=1)
    assert backbone.branch_merge_stages == (1, 2) and backbone.blocks[3].merge_groups == PAIRED_BRANCHES
    # Regression (hostile-user probe): groups without stages were accepted and ignored; a shipped
    # config's width_mult on a timm model ended in a TypeError traceback.
    cfg = load_config(PretrainConfig, overrides=["model.name=mednet_test", "model.branch_merge_groups=[[1,5],[3,7]]"])
    with pytest.raises(ValueError, match="has no effect without model.branch_merge"):
        build_backbone(cfg, channels=1)
    cfg = load_config(PretrainConfig, overrides=["model.name=efficientnet_lite0", "model.width_mult=1.0"])
    with pytest.raises(ValueError, match="'efficientnet_lite0' has no such setting: set model.width_mult to null"):
        build_backbone(cfg, channels=3)
    assert build_backbone(PretrainConfig(model=ModelSection(name="mednet_test")), channels=1).branch_merge_stages == ()


def test_channels_last_float32(images):
    separate, merged = _pair("mednet_gray", {"width_mult": 0.5}, stages=(1,), dtype=torch.float32)
    separate, merged = (m.to(memory_format=torch.channels_last) for m in (separate, merged))
    _train_steps((separate, merged), images.contiguous(memory_format=torch.channels_last), steps=1, tol=F32)


def test_bf16_autocast_runs(images):
    """Emulated bf16 is slow on AVX2: a tiny batch, one step; the merged path runs and updates its BNs."""
    _, merged = _pair("mednet_test", {}, stages=(1,), dtype=torch.float32)
    merged.train().to(memory_format=torch.channels_last)
    x = images[:2, :, :20, :20].contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = merged(x)
    out.float().sum().backward()
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in merged.parameters())
    bns = [branch.bn for branch in merged.blocks[0].branches]
    assert all(bn.num_batches_tracked.item() == 1 and bn.running_mean.dtype == torch.float32 for bn in bns)
    assert all(bn.running_var.ne(1).any() for bn in bns)


def test_fuse_for_inference_of_a_merged_model(images):
    separate, merged = _pair("mednet_test", {}, dtype=torch.float32)
    _train_steps((separate, merged), images, steps=1, tol=F32)
    fused = merged.eval().fuse_for_inference()
    assert fused.branch_merge_stages == () and merged.branch_merge_stages == ALL_STAGES
    with torch.no_grad():
        torch.testing.assert_close(fused(images), separate.eval()(images), **F32)
    with pytest.raises(ValueError, match="were folded"):
        fused.blocks[0].merged_branches(images)


def test_features_and_intermediates_unaffected(images):
    separate, merged = _pair("mednet_test", {}, dtype=torch.float32)
    separate.eval(), merged.eval()
    with torch.no_grad():
        ref_final, ref_maps = separate.forward_intermediates(images)
        final, maps = merged.forward_intermediates(images)
        torch.testing.assert_close(final, ref_final, **F32)
        for a, b in zip(maps, ref_maps, strict=True):
            torch.testing.assert_close(a, b, **F32)
        for a, b in zip(to_features(merged)(images), to_features(separate)(images), strict=True):
            torch.testing.assert_close(a, b, **F32)
