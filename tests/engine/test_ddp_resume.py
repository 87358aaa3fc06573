"""Two gloo ranks on a toy regression: the DDP paths of resume, metric reduction and layout checks.

One spawn (process start-up dominates on 2 cores); each rank records what it saw in a JSON file and
the tests read them. Every rank takes part in every call, so a failing check cannot leave the
other rank waiting in a collective (and the process group times out after 60 s if one does).

- A run killed right after the last step of epoch 0 (6 steps, a step checkpoint every 3) resumes
  from the mid-epoch checkpoint of step 3, not from one of step 6 that claims to be mid-epoch; the
  resumed run matches an uninterrupted one (weights bit for bit, metrics and log records).
- With a loader without ``len``, fit cannot tell the epoch's last step and writes that
  checkpoint; resuming from it trains no batch before the epoch's metrics are reduced, which needs
  rank 1 to restore the saved metric names with zero sums (it had none: a gloo hang).
- ``reduce_metrics`` with different names on the ranks raises a clear error on both.
- ``evaluate`` with a rank that holds no sample.
- ``fit(channels_last=True)`` refuses a model that DDP wrapped in NCHW layout.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

WORLD = 2
N = 24  # 12 samples per rank, batches of 2: 6 steps per epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g)
    return TensorDataset(x, x @ torch.arange(1.0, 6.0) + 0.1 * torch.randn(N, generator=g))


def _mse(model: nn.Module, batch):
    from openmednet.engine.trainer import LossOutput

    x, y = batch
    pred = model(x).squeeze(1)
    return LossOutput(nn.functional.mse_loss(pred, y), len(y), {"abs_err": (pred - y).abs().mean()})


class _Stop(Exception):
    pass


class _NoLen:
    """A loader without ``len``: fit cannot tell which step ends an epoch."""

    def __init__(self, loader):
        self.loader, self.sampler = loader, loader.sampler

    def __iter__(self):
        return iter(self.loader)


def _outcome(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "ok"


def _fit(dist, run_dir: Path, *, resume: bool = False, stop_at: int | None = None, hide_len: bool = False):
    from openmednet.data.loader import build_loader
    from openmednet.engine.loop import fit

    def stop(state, model) -> None:
        if state.step == stop_at:
            raise _Stop  # on both ranks, right after the step's checkpoint (if any): a kill

    torch.manual_seed(0)
    model = dist.wrap_model(nn.Linear(5, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    loader = build_loader(_data(), batch_size=2, world_size=dist.world_size, rank=dist.rank, seed=0)
    loader = _NoLen(loader) if hide_len else loader
    history = fit(model, loader, opt, _mse, epochs=2, dist=dist, run_dir=run_dir, checkpoint_every_steps=3,
                  log_every_steps=1, resume=resume, callbacks=(stop,), plot=False)
    return model, history


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from openmednet.data.loader import build_loader
    from openmednet.engine.checkpoint import load_checkpoint
    from openmednet.engine.distributed import DistEnv
    from openmednet.engine.loop import fit
    from openmednet.engine.trainer import evaluate

    out_dir = Path(out)
    dist = DistEnv.from_env(device="cpu", timeout_s=60)
    result: dict = {}

    result["more_keys"] = _outcome(lambda: dist.reduce_metrics({"a": 1.0, **({"b": 1.0} if rank else {})}, 1.0))
    result["other_keys"] = _outcome(lambda: dist.reduce_metrics({"a" if rank == 0 else "b": 1.0}, 1.0))
    result["same_keys"] = dist.reduce_metrics({"a": float(rank)}, 1.0)

    one = TensorDataset(*(t[:1] for t in _data().tensors))  # rank 1's share is empty
    torch.manual_seed(0)
    result["eval"] = evaluate(nn.Linear(5, 1), build_loader(one, batch_size=2, world_size=WORLD, rank=rank,
                                                            shuffle=False), _mse, dist=dist)

    torch.manual_seed(0)
    conv = dist.wrap_model(nn.Conv2d(3, 4, 3))  # wrapped in NCHW, then asked for channels_last
    loader = build_loader(_data(), batch_size=2, world_size=WORLD, rank=rank, seed=0)
    result["nchw_ddp"] = _outcome(lambda: fit(conv, loader, torch.optim.SGD(conv.parameters(), lr=0.1), _mse,
                                              epochs=1, dist=dist, run_dir=out_dir / "nchw", channels_last=True,
                                              plot=False))

    clean, result["clean"] = _fit(dist, out_dir / "clean")
    result["stopped"] = _outcome(lambda: _fit(dist, out_dir / "killed", stop_at=6))
    dist.barrier()
    ckpt = load_checkpoint(out_dir / "killed" / "checkpoint-last.pt")
    result["checkpoint"] = [ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]]
    dist.barrier()
    resumed, result["resumed"] = _fit(dist, out_dir / "killed", resume=True)
    result["same_weights"] = all(torch.equal(a, b) for a, b in zip(clean.parameters(), resumed.parameters()))

    result["nolen_stopped"] = _outcome(lambda: _fit(dist, out_dir / "nolen", stop_at=6, hide_len=True))
    dist.barrier()
    ckpt = load_checkpoint(out_dir / "nolen" / "checkpoint-last.pt")
    result["nolen_checkpoint"] = [ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]]
    dist.barrier()
    resumed, result["nolen_resumed"] = _fit(dist, out_dir / "nolen", resume=True, hide_len=True)
    result["nolen_same_weights"] = all(torch.equal(a, b) for a, b in zip(clean.parameters(), resumed.parameters()))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp_resume")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_reduce_metrics_with_different_names_raises_on_every_rank(ranks):
    _, results = ranks
    for r in results:
        for case in ("more_keys", "other_keys"):
            assert r[case].startswith("ValueError: ranks passed different metric names"), r[case]
        assert r["same_keys"] == {"a": 0.5}


def test_evaluate_with_an_empty_rank(ranks):
    from openmednet.engine.distributed import DistEnv
    from openmednet.engine.trainer import evaluate

    _, results = ranks
    torch.manual_seed(0)
    one = TensorDataset(*(t[:1] for t in _data().tensors))
    single = evaluate(nn.Linear(5, 1), torch.utils.data.DataLoader(one, batch_size=2), _mse, dist=DistEnv())
    for r in results:
        assert r["eval"] == pytest.approx(single, rel=1e-6)


def test_channels_last_after_ddp_wrapping_is_refused(ranks):
    _, results = ranks
    for r in results:
        assert r["nchw_ddp"].startswith("ValueError: channels_last=True but the DDP-wrapped model"), r["nchw_ddp"]
        assert "convert before wrapping" in r["nchw_ddp"]


def test_killed_at_the_epochs_last_step_resumes_from_the_last_mid_epoch_checkpoint(ranks):
    out, results = ranks
    for r in results:
        assert r["stopped"] == "_Stop: "
        assert r["checkpoint"] == [0, 3, 3]  # step 3's, not a "mid-epoch" one of step 6 (batch 6 of 6)
        assert r["same_weights"]
    for r in results:  # every rank returns the global epoch records
        assert [e["epoch"] for e in r["resumed"]] == [0, 1]
        assert _comparable(r["resumed"]) == _plain(r["clean"])
    assert [(e["kind"], e["step"]) for e in _log(out, "killed")] == [(e["kind"], e["step"]) for e in _log(out, "clean")]
    assert _comparable(_log(out, "killed")) == _plain(_log(out, "clean"))


def test_resume_at_an_epochs_end_restores_metric_names_on_every_rank(ranks):
    out, results = ranks
    for r in results:
        assert r["nolen_stopped"] == "_Stop: "
        assert r["nolen_checkpoint"] == [0, 6, 6]  # the whole epoch done, saved as mid-epoch
        assert r["nolen_same_weights"]
        assert _comparable(r["nolen_resumed"]) == _plain(r["clean"])
    assert _comparable(_log(out, "nolen")) == _plain(_log(out, "clean"))


_DROP = ("train/images_per_s", "time_s")  # wall-clock dependent


def _plain(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in rec.items() if k not in _DROP} for rec in records]


def _comparable(records: list[dict]) -> list[dict]:
    # Resumed sums are added in another order (rank 0 holds the global sums of the first part).
    return [{k: pytest.approx(v, rel=1e-9) if isinstance(v, float) else v for k, v in rec.items()}
            for rec in _plain(records)]


def _log(out: Path, run: str) -> list[dict]:
    return [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
