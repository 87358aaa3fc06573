"""Exact resume: a run killed with SIGKILL mid-epoch and resumed ends with the same weights as an
uninterrupted run (deterministic mode: fp32, no loader workers), and ``--resume`` guards.

The killed run is a real separate process: a step callback sends SIGKILL to it right after
optimizer step 5, between the step checkpoints of steps 4 and 6, i.e. in the middle of epoch 1
(3 steps per epoch, 2 epochs). Nothing gets a chance to flush or clean up, as with an OOM kill or
a node loss.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openmednet.config import load_config
from openmednet.engine.checkpoint import load_checkpoint
from openmednet.engine.pretrain import PretrainConfig, run_pretraining

KILL_AFTER_STEP = 5


def _overrides(corpus: Path, out: Path) -> list[str]:
    return [
        f"corpus={corpus}", f"out={out}", "model.name=mednet_test", "objective.kind=combined",
        "data.image_size=32", "data.batch_size=8", "data.num_workers=0", "train.epochs=2",
        "train.precision=fp32", "train.deterministic=true", "train.progress=false",
        "train.checkpoint_every_steps=2", "train.log_every_steps=1", "optim.lr=0.003", "monitor.k=3",
    ]


def _epoch_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tiny_corpus: Path, tmp_path: Path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from openmednet.config import load_config
        from openmednet.engine.pretrain import PretrainConfig, run_pretraining

        def kill(state, model):
            if state.step == {KILL_AFTER_STEP}:
                os.kill(os.getpid(), signal.SIGKILL)

        cfg = load_config(PretrainConfig, None, {_overrides(tiny_corpus, killed)!r})
        run_pretraining(cfg, callbacks=(kill,))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = load_checkpoint(killed / "checkpoint-last.pt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (1, 1, 4)  # mid-epoch checkpoint
    assert not (killed / "backbone").exists()

    with pytest.raises(ValueError, match="--resume"):
        run_pretraining(load_config(PretrainConfig, None, _overrides(tiny_corpus, killed)))
    resumed = run_pretraining(load_config(PretrainConfig, None, [*_overrides(tiny_corpus, killed), "resume=true"]))
    assert [r["epoch"] for r in resumed] == [1]
    run_pretraining(load_config(PretrainConfig, None, _overrides(tiny_corpus, clean)))

    a = load_file(killed / "backbone" / "model.safetensors")
    b = load_file(clean / "backbone" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    heads_a = load_checkpoint(killed / "checkpoint-last.pt")["model"]
    heads_b = load_checkpoint(clean / "checkpoint-last.pt")["model"]
    for k in heads_b:
        assert torch.equal(heads_a[k], heads_b[k]), k
    # The log of the resumed run is the log of the clean run: same records, replayed ones not doubled.
    ra, rb = _epoch_records(killed), _epoch_records(clean)
    drop = ("train/images_per_s", "time_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == [
        {k: v for k, v in r.items() if k not in drop} for r in rb
    ]


def _ddp_worker(rank: int, port: int, corpus: str, out: str, crash: bool, resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    overrides = [*_overrides(Path(corpus), Path(out)), "data.batch_size=4", *(["resume=true"] if resume else [])]

    def crash_after_step_5(state, model) -> None:
        if crash and state.step == KILL_AFTER_STEP:
            os._exit(1)  # both ranks die at once, with no cleanup, like a lost node

    run_pretraining(load_config(PretrainConfig, None, overrides), callbacks=(crash_after_step_5,))


@pytest.mark.slow
def test_two_rank_crash_and_resume_gives_identical_weights(tiny_corpus: Path, tmp_path: Path):
    import socket

    import torch.multiprocessing as mp

    def _free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(_ddp_worker, args=(_free_port(), str(tiny_corpus), str(crashed), True, False), nprocs=2)
    assert load_checkpoint(crashed / "checkpoint-last.pt")["step"] == 4
    mp.spawn(_ddp_worker, args=(_free_port(), str(tiny_corpus), str(crashed), False, True), nprocs=2)
    mp.spawn(_ddp_worker, args=(_free_port(), str(tiny_corpus), str(clean), False, False), nprocs=2)
    a = load_file(crashed / "backbone" / "model.safetensors")
    b = load_file(clean / "backbone" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# Regression (review finding): only the CLI warned; the Python API started from scratch silently.
def test_resume_without_a_checkpoint_warns_from_the_api(tiny_corpus: Path, tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    short = [*_overrides(tiny_corpus, out), "objective.kind=supervised", "train.epochs=1",
             "train.max_steps_per_epoch=1", "monitor.enabled=false", "resume=true"]
    with pytest.warns(UserWarning, match=re.escape(f"{out} holds no checkpoint-last.pt, so this run starts from scratch")):
        run_pretraining(load_config(PretrainConfig, None, short))
    assert (out / "checkpoint-last.pt").is_file()
    with warnings.catch_warnings(record=True) as caught:  # a real resume says nothing of the kind
        warnings.simplefilter("always")
        run_pretraining(load_config(PretrainConfig, None, short))
    assert not [w for w in caught if "starts from scratch" in str(w.message)]


def test_resume_refuses_another_network_or_corpus_and_records_other_changes(tiny_corpus: Path, tmp_path: Path):
    """Regression (hostile-user probe): ``--resume`` with another width or objective ended in a
    size-mismatch traceback, and with another learning rate or epoch count it rewrote config.yaml
    without a trace of the settings the earlier epochs had used."""
    out = tmp_path / "run"
    short = [*_overrides(tiny_corpus, out), "objective.kind=supervised", "train.epochs=1",
             "train.max_steps_per_epoch=1", "monitor.enabled=false"]
    run_pretraining(load_config(PretrainConfig, None, short))
    first = (out / "config.yaml").read_text()
    for change, named in (("model.width_mult=0.5", "model.width_mult: None -> 0.5"),
                          ("objective.kind=simclr", "objective.kind: 'supervised' -> 'simclr'"),
                          ("data.image_size=48", "data.image_size: 32 -> 48")):
        with pytest.raises(ValueError, match=re.escape(named)):
            run_pretraining(load_config(PretrainConfig, None, [*short, "resume=true", change]))
        assert (out / "config.yaml").read_text() == first
    with pytest.warns(UserWarning, match=r"changed settings \(optim.lr: 0.003 -> 0.001, train.epochs: 1 -> 2\)"):
        run_pretraining(load_config(PretrainConfig, None, [*short, "resume=true", "train.epochs=2", "optim.lr=0.001"]))
    assert (out / "config.before-resume-1.yaml").read_text() == first
