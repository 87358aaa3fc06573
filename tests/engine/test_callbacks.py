"""The loop's callbacks without a run directory (fine-tuning's use of ``fit``): early stopping on a
validation score with the best epoch's weights restored, the model-choice rule, hook order."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from openmednet.engine.callbacks import Callback, EarlyStopping, better_score
from openmednet.engine.distributed import DistEnv
from openmednet.engine.loop import fit
from openmednet.engine.trainer import LossOutput

SINGLE = DistEnv()


def _mse(model: nn.Module, batch) -> LossOutput:
    x, y = batch
    return LossOutput(nn.functional.mse_loss(model(x).squeeze(1), y), len(y))


def _data(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return DataLoader(TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5])), batch_size=4)


def test_better_score_prefers_the_metric_then_the_lower_loss_and_ranks_nan_last():
    assert better_score((0.5, 9.0), None)
    assert better_score((0.8, 9.0), (0.7, 0.1))
    assert better_score((0.7, 0.2), (0.7, 0.3)) and not better_score((0.7, 0.3), (0.7, 0.3))
    assert better_score((0.0, 5.0), (math.nan, 0.1)) and not better_score((math.nan, 0.1), (0.0, 5.0))


def test_early_stopping_stops_after_patience_and_restores_the_best_epochs_weights():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    scores = iter([0.6, 0.9, 0.8, 0.7, 0.95])  # best at epoch 2, then 2 worse epochs: stop after epoch 4
    weights = {}

    def measure(m: nn.Module) -> dict[str, float]:
        weights[len(weights) + 1] = m.weight.detach().clone()
        return {"val_score": next(scores), "val_loss": 1.0}

    stopping = EarlyStopping(measure, patience=2)
    records = fit(model, _data(), torch.optim.SGD(model.parameters(), lr=0.05), _mse, epochs=5, dist=SINGLE,
                  callbacks=[stopping], first_epoch=1)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r["val_score"] for r in records] == [0.6, 0.9, 0.8, 0.7]
    assert stopping.best_epoch == 2
    assert torch.equal(model.weight, weights[2]) and not torch.equal(model.weight, weights[4])


def test_min_epochs_warm_up_is_measured_but_neither_chosen_nor_counted_by_patience():
    # The lgg_flair case (docs/results.md, "Segmentation"): a noisy early peak (epoch 2) that
    # plain patience would keep, stopping the run at epoch 4 as above.
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    scores = iter([0.6, 0.9, 0.1, 0.2, 0.3, 0.25, 0.2, 0.5])
    weights = {}

    def measure(m: nn.Module) -> dict[str, float]:
        weights[len(weights) + 1] = m.weight.detach().clone()
        return {"val_score": next(scores), "val_loss": 1.0}

    stopping = EarlyStopping(measure, patience=2, min_epochs=3)
    records = fit(model, _data(), torch.optim.SGD(model.parameters(), lr=0.05), _mse, epochs=8, dist=SINGLE,
                  callbacks=[stopping], first_epoch=1)
    # epochs 1-3 are warm-up; 4 (0.2) and 5 (0.3) improve, 6 and 7 do not: stop after epoch 7
    assert [r["val_score"] for r in records] == [0.6, 0.9, 0.1, 0.2, 0.3, 0.25, 0.2]
    assert stopping.best_epoch == 5
    assert torch.equal(model.weight, weights[5])


def test_min_epochs_must_leave_an_epoch_to_choose(tmp_path):
    from openmednet.eval.finetune import FinetuneConfig

    with pytest.raises(ValueError, match=r"min_epochs must be in \[0, epochs\)"):
        FinetuneConfig(data=tmp_path, out=tmp_path / "run", epochs=5, min_epochs=5)
    with pytest.raises(ValueError, match="min_epochs >= 0"):
        EarlyStopping(lambda m: {}, patience=1, min_epochs=-1)


def test_hooks_run_in_order_and_fit_writes_nothing_without_a_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    class Spy(Callback):
        def restore(self, loop): calls.append("restore")
        def on_fit_start(self, loop): calls.append("fit_start")
        def on_epoch_start(self, loop, resumed): calls.append(f"epoch_start {resumed}")
        def on_step(self, loop): calls.append(f"step {loop.state.step}")
        def on_epoch_end(self, loop, record): calls.append("epoch_end" + (" timed" if "time_s" in record else ""))
        def on_record(self, loop, record): calls.append("record" + (" timed" if "time_s" in record else ""))
        def on_fit_end(self, loop): calls.append("fit_end")
        def teardown(self, loop): calls.append("teardown")

    model = nn.Linear(3, 1)
    fit(model, _data(8), torch.optim.SGD(model.parameters(), lr=0.01), _mse, epochs=1, dist=SINGLE, callbacks=[Spy()])
    assert calls == ["restore", "fit_start", "epoch_start False", "step 1", "step 2", "epoch_end", "record timed",
                     "fit_end", "teardown"]
    assert list(tmp_path.iterdir()) == []


def test_patience_below_one_is_refused():
    with pytest.raises(ValueError, match="patience must be >= 1"):
        EarlyStopping(lambda m: {}, patience=0)


def test_a_run_that_ends_inside_the_warm_up_warns_and_keeps_its_last_weights():
    model = nn.Linear(3, 1)
    stopping = EarlyStopping(lambda m: {"val_score": 0.5, "val_loss": 1.0}, patience=1, min_epochs=3)
    with pytest.warns(UserWarning, match="no epoch was chosen"):
        fit(model, _data(), torch.optim.SGD(model.parameters(), lr=0.05), _mse, epochs=2, dist=SINGLE,
            callbacks=[stopping], first_epoch=1)
    assert stopping.best_epoch is None
