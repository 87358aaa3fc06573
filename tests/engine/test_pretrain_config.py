"""PretrainConfig loading and the supervised multi-source heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openmednet.config import load_config
from openmednet.engine.pretrain import PretrainConfig, SupervisedHeads

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LABELS = ["brain/glioma", "brain/notumor", "chest/NORMAL", "chest/PNEUMONIA", "chest/other"]


@pytest.mark.parametrize("name", ["pretrain_gray64.yaml", "pretrain_color64.yaml"])
def test_shipped_configs_load_with_overrides(name: str):
    cfg = load_config(PretrainConfig, CONFIGS / name, ["optim.lr=0.1", "train.epochs=2", "data.crop_scale=[0.3,1]"])
    assert cfg.optim.lr == 0.1 and cfg.train.epochs == 2 and cfg.data.crop_scale == (0.3, 1.0)
    assert cfg.data.image_size == 64 and cfg.train.precision == "auto"
    assert cfg.model.name == ("mednet_gray" if "gray" in name else "mednet_color")


def test_unknown_key_suggests_the_closest():
    with pytest.raises(KeyError, match=r"unknown config key 'optim.lrr'; did you mean 'lr'\?"):
        load_config(PretrainConfig, None, ["optim.lrr=0.1"])
    with pytest.raises(KeyError, match="did you mean 'objective'"):
        load_config(PretrainConfig, None, ["objectve.kind=simclr"])


def _manual_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits, dim=1)[torch.arange(len(target)), target]


def test_union_head_ignores_unlabelled_images():
    torch.manual_seed(0)
    heads = SupervisedHeads(6, LABELS, "union")
    x, labels = torch.randn(5, 6), torch.tensor([0, -1, 3, 4, -1])
    loss = heads(x, labels)
    keep = labels >= 0
    expected = _manual_ce(heads.heads["union"](x[keep]), labels[keep]).mean()
    torch.testing.assert_close(loss, expected)


def test_per_source_heads_use_each_sources_own_softmax():
    torch.manual_seed(0)
    heads = SupervisedHeads(6, LABELS, "per_source")
    assert {k: v.out_features for k, v in heads.heads.items()} == {"brain": 2, "chest": 3}
    x, labels = torch.randn(4, 6), torch.tensor([1, -1, 2, 4])  # brain/notumor, unlabelled, chest/NORMAL, chest/other
    loss = heads(x, labels)
    expected = torch.cat([
        _manual_ce(heads.heads["brain"](x[[0]]), torch.tensor([1])),
        _manual_ce(heads.heads["chest"](x[[2, 3]]), torch.tensor([0, 2])),
    ]).mean()
    torch.testing.assert_close(loss, expected)


def test_all_unlabelled_batch_gives_zero_loss_with_gradients_everywhere():
    heads = SupervisedHeads(6, LABELS, "per_source")
    loss = heads(torch.randn(3, 6), torch.full((3,), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in heads.parameters())  # DDP needs every parameter in the graph


def test_supervised_objective_needs_labels():
    with pytest.raises(ValueError, match="objective=simclr"):
        SupervisedHeads(6, [], "union")


class _Enabled(Exception):
    pass


@pytest.mark.parametrize("preset", [None, ":16:8"])
def test_deterministic_sets_the_cublas_workspace_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset):
    # CUDA's deterministic matmuls need CUBLAS_WORKSPACE_CONFIG before cuBLAS starts; a user's value wins.
    import os

    from openmednet.engine.pretrain import run_pretraining

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "placeholder")  # restored (removed) after the test
    if preset is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset)
    seen = []
    real = torch.use_deterministic_algorithms

    def record(mode: bool, **kw) -> None:
        if mode:  # the run's switch-on: stop the run there
            seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
            raise _Enabled
        real(mode, **kw)  # the restore in run_pretraining's finally

    monkeypatch.setattr(torch, "use_deterministic_algorithms", record)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "manifest.json").write_text("{}")
    cfg = load_config(PretrainConfig, None, [f"corpus={tmp_path / 'corpus'}", f"out={tmp_path / 'run'}",
                                             "train.deterministic=true", "train.device=cpu"])
    with pytest.raises(_Enabled):
        run_pretraining(cfg)
    assert seen == [preset or ":4096:8"]
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == preset  # the caller's environment is left as it was
