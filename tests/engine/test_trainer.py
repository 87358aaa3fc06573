"""The training loop in one process: metrics, gradient accumulation, non-finite loss, resume files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from openmednet.engine.checkpoint import load_checkpoint
from openmednet.engine.distributed import DistEnv
from openmednet.engine.trainer import (
    LossOutput,
    NonFiniteLossError,
    evaluate,
    fit,
    train_one_epoch,
)

SINGLE = DistEnv()


def mse_loss(model: nn.Module, batch) -> LossOutput:
    x, y = batch
    pred = model(x).squeeze(1)
    return LossOutput(nn.functional.mse_loss(pred, y), len(y), {"abs_err": (pred - y).abs().mean()})


def _regression(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, x @ torch.arange(1.0, 6.0) + 0.1 * torch.randn(n, generator=g))


def test_epoch_metrics_are_per_sample_means():
    data = _regression(10)
    model = nn.Linear(5, 1)
    loader = DataLoader(data, batch_size=4)  # batches of 4, 4, 2: a plain batch mean would be wrong
    metrics = evaluate(model, loader, mse_loss, dist=SINGLE)
    x, y = data.tensors
    with torch.no_grad():
        pred = model(x).squeeze(1)
    assert metrics["loss"] == pytest.approx(((pred - y) ** 2).mean().item(), rel=1e-6)
    assert metrics["abs_err"] == pytest.approx((pred - y).abs().mean().item(), rel=1e-6)


def test_gradient_accumulation_matches_a_larger_batch():
    data = _regression(16)
    torch.manual_seed(0)
    big, small = nn.Linear(5, 1), nn.Linear(5, 1)
    small.load_state_dict(big.state_dict())
    for model, batch, accum in ((big, 8, 1), (small, 4, 2)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        metrics = train_one_epoch(model, DataLoader(data, batch_size=batch), opt, mse_loss, epoch=0, dist=SINGLE,
                                  grad_accum=accum)
        assert metrics["images_per_s"] > 0
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_max_steps_caps_optimizer_steps():
    opt = torch.optim.SGD((model := nn.Linear(5, 1)).parameters(), lr=0.01)
    from openmednet.engine.trainer import TrainState

    state = TrainState()
    train_one_epoch(model, DataLoader(_regression(24), batch_size=2), opt, mse_loss, epoch=0, dist=SINGLE,
                    max_steps=3, state=state)
    assert (state.step, state.batch_in_epoch) == (3, 3)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # A corrupt target (inf) in the second epoch: the run must stop there, not write inf weights.
    x, y = _regression(8).tensors
    y = y.clone()
    y[5] = float("inf")
    first = TensorDataset(x[:4], y[:4])
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    class TwoEpochs:  # epoch 0 reads clean rows, epoch 1 the corrupt ones
        epoch = 0

        def __len__(self):
            return 2

        def __iter__(self):
            rows = first if self.epoch == 0 else TensorDataset(x[4:], y[4:])
            return iter(DataLoader(rows, batch_size=2))

        def set_epoch(self, epoch):  # plays the sampler's role
            self.epoch = epoch

    loader = TwoEpochs()
    loader.sampler = loader
    with pytest.raises(NonFiniteLossError, match=r"loss is inf .* epoch 1.*last good checkpoint is .*checkpoint-last\.pt"):
        fit(model, loader, opt, mse_loss, epochs=3, dist=SINGLE, run_dir=tmp_path, plot=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint-last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was never applied
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0]


def test_fit_refuses_fp16_on_cpu(tmp_path):
    opt = torch.optim.SGD((model := nn.Linear(5, 1)).parameters(), lr=0.01)
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        fit(model, DataLoader(_regression(4), batch_size=2), opt, mse_loss, epochs=1, dist=SINGLE, run_dir=tmp_path,
            precision="fp16", plot=False)
