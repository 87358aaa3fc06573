"""``DistEnv.from_env`` in one process: device strings are parsed, not guessed."""

from __future__ import annotations

import pytest
import torch

from openmednet.engine.distributed import DistEnv


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def two_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """CUDA reported available with two devices; set_device records instead of touching a GPU."""
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("device", [None, "cpu"])
def test_cpu(single_process, device):
    if device is None and torch.cuda.is_available():
        pytest.skip("None means CUDA on this machine")
    assert DistEnv.from_env(device=device).device == torch.device("cpu")


# (an id other than "gpu": that keyword marks tests that need CUDA, see tests/conftest.py)
@pytest.mark.parametrize("device", [pytest.param("gpu", id="word-gpu"), "cuda0", "cpux", "mps", "meta"])
def test_unknown_or_unsupported_devices_are_errors_not_cpu(single_process, device):
    with pytest.raises(ValueError, match=f"device '{device}'.*use 'cpu', 'cuda' or 'cuda:N'"):
        DistEnv.from_env(device=device)


def test_cuda_without_cuda(single_process, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda:1' requested but torch.cuda.is_available\(\) is False"):
        DistEnv.from_env(device="cuda:1")


def test_one_process_keeps_an_explicit_gpu_index(single_process, two_fake_gpus):
    assert DistEnv.from_env(device="cuda:1").device == torch.device("cuda", 1)
    assert DistEnv.from_env(device="cuda").device == torch.device("cuda", 0)
    assert two_fake_gpus == [torch.device("cuda", 1), torch.device("cuda", 0)]
    with pytest.raises(ValueError, match=r"'cuda:2' does not exist: this machine has 2 CUDA device"):
        DistEnv.from_env(device="cuda:2")


def test_torchrun_rank_refuses_a_gpu_index_other_than_its_local_rank(monkeypatch: pytest.MonkeyPatch, two_fake_gpus):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"each rank uses cuda:LOCAL_RANK \(this rank: cuda:0\)"):
        DistEnv.from_env(device="cuda:1")
    assert two_fake_gpus == []  # refused before any process group or device was touched
