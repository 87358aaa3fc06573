"""The training loop in one process: metrics, gradient accumulation, non-finite loss, resume files."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from openmednet.engine.callbacks import MetricsLog, _resume
from openmednet.engine.checkpoint import load_checkpoint
from openmednet.engine.distributed import DistEnv
from openmednet.engine.loop import fit
from openmednet.engine.trainer import (
    LossOutput,
    NonFiniteLossError,
    TrainState,
    evaluate,
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


# ------------------------------------------------------------------------ review fixes

class _Stop(Exception):
    """Raised by a step callback: the run dies there, as a killed one would (no epoch-end save)."""


def _stop_at(step: int):
    def callback(state: TrainState, model: nn.Module) -> None:
        if state.step == step:
            raise _Stop

    return callback


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grad_accum_1_is_a_plain_training_loop_bit_for_bit(precision):
    # The fine-tuning runs depend on it: same loss, same steps, same RNG draws as the textbook loop.
    data = _regression(12)

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.3), nn.Linear(8, 1))
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, opt = make()
    torch.manual_seed(1)
    metrics = train_one_epoch(model, DataLoader(data, batch_size=4), opt, mse_loss, epoch=0, dist=SINGLE,
                              precision=precision)
    rng_after = torch.get_rng_state()

    ref, ref_opt = make()
    ref.train()
    torch.manual_seed(1)
    losses = []
    for batch in DataLoader(data, batch_size=4):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = mse_loss(ref, batch)
        losses.append(out.loss.item())
        out.loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    assert torch.equal(torch.get_rng_state(), rng_after)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert metrics["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)


def test_partial_accumulation_group_is_a_full_step():
    # 4 batches with grad_accum=3: one step on batches 1-3, one on batch 4 alone, as large as a
    # step on a whole group (the mean of its losses), followed by the scheduler and on_step.
    data = _regression(8)
    torch.manual_seed(0)
    model, ref = nn.Linear(5, 1), nn.Linear(5, 1)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    seen = []
    state = TrainState()
    train_one_epoch(model, DataLoader(data, batch_size=2), opt, mse_loss, epoch=0, dist=SINGLE, grad_accum=3,
                    scheduler=sched, state=state, on_step=lambda st: seen.append((st.step, st.batch_in_epoch)))
    assert seen == [(1, 3), (2, 4)]
    assert state.step == 2 and sched.last_epoch == 2

    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    batches = list(DataLoader(data, batch_size=2))
    for group, lr in ((batches[:3], 0.05), (batches[3:], 0.025)):
        for g in ref_opt.param_groups:
            g["lr"] = lr
        loss = sum(mse_loss(ref, b).loss for b in group) / len(group)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fp16_without_a_scaler_is_refused():
    opt = torch.optim.SGD((model := nn.Linear(5, 1)).parameters(), lr=0.01)
    with pytest.raises(ValueError, match="fp16.*GradScaler"):
        train_one_epoch(model, DataLoader(_regression(4), batch_size=2), opt, mse_loss, epoch=0, dist=SINGLE,
                        precision="fp16")


def _fit(run_dir, *, batch_size=2, grad_accum=1, epochs=2, resume=False, callbacks=(), seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    history = fit(model, DataLoader(_regression(8), batch_size=batch_size), opt, mse_loss, epochs=epochs,
                  dist=SINGLE, run_dir=run_dir, grad_accum=grad_accum, checkpoint_every_steps=2,
                  log_every_steps=1, resume=resume, callbacks=callbacks, plot=False)
    return model, history


def test_no_mid_epoch_checkpoint_on_the_epochs_last_step(tmp_path):
    # 4 steps per epoch, a checkpoint every 2: step 4 ends the epoch, so only step 2's is written
    # before the run dies in step 4's callback (the epoch-end checkpoint never came).
    with pytest.raises(_Stop):
        _fit(tmp_path, callbacks=(_stop_at(4),))
    ckpt = load_checkpoint(tmp_path / "checkpoint-last.pt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (0, 2, 2)
    assert {k: ckpt["train_state"][k] for k in ("world_size", "batch_size", "grad_accum")} == {
        "world_size": 1, "batch_size": 2, "grad_accum": 1}


def test_mid_epoch_resume_refuses_another_layout(tmp_path):
    with pytest.raises(_Stop):
        _fit(tmp_path, callbacks=(_stop_at(3),))  # dies after the mid-epoch checkpoint of step 2
    with pytest.raises(ValueError, match=r"batch_size=2.*batch_size=4.*skip or repeat"):
        _fit(tmp_path, batch_size=4, resume=True)
    with pytest.raises(ValueError, match=r"grad_accum=1.*grad_accum=2"):
        _fit(tmp_path, grad_accum=2, resume=True)
    resumed, _ = _fit(tmp_path, resume=True)  # the saved layout resumes, to the clean run's weights
    clean, _ = _fit(tmp_path / "clean")
    for a, b in zip(resumed.parameters(), clean.parameters()):
        assert torch.equal(a, b)


def test_epoch_boundary_resume_may_change_the_layout(tmp_path):
    _fit(tmp_path, epochs=1)
    _, history = _fit(tmp_path, epochs=2, batch_size=4, resume=True)
    assert [r["epoch"] for r in history] == [1] and history[0]["step"] == 4 + 2


def test_resume_loads_on_the_cpu_whatever_the_device(tmp_path):
    # On a GPU, loading with map_location=dist.device put the saved RNG states on the GPU, where
    # torch.set_rng_state rejects them. The meta device stands in for it here: nothing loaded there
    # can be restored either.
    with pytest.raises(_Stop):
        _fit(tmp_path, callbacks=(_stop_at(3),))
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    loader = DataLoader(_regression(8), batch_size=2)
    layout = {"world_size": 1, "batch_size": 2, "grad_accum": 1}
    state, _, batches = _resume(tmp_path / "checkpoint-last.pt", model, opt, None, None, loader,
                                DistEnv(device=torch.device("meta")), layout)
    assert (state.step, state.batch_in_epoch) == (2, 2) and len(list(batches)) == 2
    ckpt = load_checkpoint(tmp_path / "checkpoint-last.pt")
    assert torch.equal(model.weight, ckpt["model"]["weight"])
    assert torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"])


def test_half_written_metrics_line_is_skipped_on_resume(tmp_path):
    with pytest.raises(_Stop):
        _fit(tmp_path, callbacks=(_stop_at(3),))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "epoch": 0, "st')  # killed in the middle of an append
    with pytest.warns(UserWarning, match=r"line 4: not a complete JSON record"):
        _fit(tmp_path, resume=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 9))


def test_metrics_log_truncate_and_read_metrics_skip_broken_lines(tmp_path):
    from openmednet.engine.plots import read_metrics

    log = MetricsLog(tmp_path, enabled=True)
    for step in (1, 2, 3):
        log.write({"kind": "step", "step": step, "train/loss": 1.0})
    with open(log.path, "a") as f:
        f.write("not json\n" + '{"kind": "ep')
    with pytest.warns(UserWarning) as caught:
        assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    assert len(caught) == 2
    with pytest.warns(UserWarning) as caught:
        log.truncate(before_step=3)
    assert [re.search(r"line \d+", str(w.message))[0] for w in caught] == ["line 4", "line 5"]
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2]
