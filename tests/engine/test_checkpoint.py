"""Checkpoints: atomic, rank-0 only, plain types loadable with weights_only, RNG restored exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import openmednet
from openmednet.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from openmednet.engine.distributed import DistEnv
from openmednet.engine.optim import build_optimizer, build_scheduler


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_roundtrip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    first = _draws()
    restore_rng_state(state)
    assert _draws() == first


def test_save_load_roundtrip_restores_training_state(tmp_path):
    model = openmednet.create_model("mednet_test", num_classes=2)
    opt = build_optimizer(model, "adamw", lr=1e-3)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2)
    model(torch.randn(4, 1, 32, 32)).sum().backward()
    opt.step(), sched.step()
    path = save_checkpoint(
        tmp_path / "checkpoint-last.pt", model=model, optimizer=opt, scheduler=sched, epoch=3, step=17,
        model_name="mednet_test", model_args=model.model_args(), config={"optim": {"lr": 1e-3}},
    )
    ckpt = load_checkpoint(path)  # weights_only=True inside: plain types only
    assert (ckpt["epoch"], ckpt["step"], ckpt["model_name"]) == (3, 17, "mednet_test")
    rebuilt = openmednet.create_model(ckpt["model_name"], **ckpt["model_args"])
    rebuilt.load_state_dict(ckpt["model"])
    for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = build_optimizer(rebuilt, "adamw", lr=1e-3)
    opt2.load_state_dict(ckpt["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert ckpt["scheduler"]["last_epoch"] == 1
    assert ckpt["versions"]["torch"] == str(torch.__version__)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pt"]  # no temporary left behind


def test_only_rank_zero_writes(tmp_path):
    model = torch.nn.Linear(2, 2)
    rank1 = DistEnv(rank=1, world_size=2)
    assert save_checkpoint(tmp_path / "c.pt", model=model, optimizer=None, epoch=0, step=0, dist=rank1) is None
    assert not (tmp_path / "c.pt").exists()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an OpenMedNet checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_truncated_empty_or_garbage_checkpoints_are_one_clear_error(tmp_path):
    """Regression (hostile-user probe): a truncated checkpoint gave torch's traceback, a text file an
    unpickling traceback, and an empty file a bare "Aborted." (EOFError, read by click as an abort)."""
    model = openmednet.create_model("mednet_test", num_classes=2)
    good = save_checkpoint(tmp_path / "good.pt", model=model, optimizer=None, epoch=0, step=0)
    data = good.read_bytes()
    for name, content in (("truncated", data[: len(data) // 3]), ("empty", b""), ("garbage", b"garbage\n")):
        (tmp_path / f"{name}.pt").write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.pt is unreadable, truncated or corrupt .*: delete it"):
            load_checkpoint(tmp_path / f"{name}.pt")


def test_rng_state_restores_exactly_after_a_cpu_mapped_load():
    # The resume path: states saved in a checkpoint, read back with map_location="cpu".
    import io

    random.seed(4), np.random.seed(5), torch.manual_seed(6)
    buf = io.BytesIO()
    torch.save({"rng": capture_rng_state()}, buf)
    first = _draws()
    buf.seek(0)
    restore_rng_state(torch.load(buf, map_location="cpu", weights_only=True)["rng"])
    assert _draws() == first


@pytest.mark.gpu
def test_rng_state_restores_from_cuda_mapped_tensors():
    # A checkpoint loaded with map_location="cuda" puts the RNG states on the GPU;
    # torch.set_rng_state takes CPU ByteTensors only.
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    first = _draws()
    on_gpu = {**state, "torch": state["torch"].cuda(), "cuda": [s.cuda() for s in state["cuda"]],
              "numpy": [*state["numpy"][:1], state["numpy"][1].cuda(), *state["numpy"][2:]]}
    restore_rng_state(on_gpu)
    assert _draws() == first
