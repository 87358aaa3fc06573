"""Two gloo processes on one CPU: the same loop as one process, under DistributedDataParallel.

One spawn (process start-up dominates on 2 cores) checks, on the tiny real corpus:
- ``evaluate`` over two ranks, each holding half of the validation images, gives the metrics of one
  process over all of them (metrics are per-sample sums reduced across ranks);
- a 2-rank supervised pre-training run lowers the loss and ends with identical weights on both ranks.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from openmednet.config import load_config
from openmednet.engine.pretrain import (
    PretrainConfig,
    PretrainModule,
    SupervisedHeads,
    pretrain_loss,
)

WORLD = 2
EPOCHS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_setup(corpus: Path, world_size: int, rank: int):
    """A fixed (seeded) supervised module in eval mode and a loader over this rank's val images."""
    import openmednet
    from openmednet.data.datasets import CorpusDataset
    from openmednet.data.loader import build_loader
    from openmednet.data.transforms import build_transform

    torch.manual_seed(0)
    backbone = openmednet.create_model("mednet_test", num_classes=0)
    ds = CorpusDataset(corpus, "val", build_transform(backbone.pretrained_cfg, False, image_size=32))
    module = PretrainModule(backbone, SupervisedHeads(backbone.num_features, ds.label_names)).eval()
    loader = build_loader(ds, batch_size=5, world_size=world_size, rank=rank, shuffle=False, pad=False)
    return module, loader


def _config(corpus: Path, out: Path) -> PretrainConfig:
    return load_config(PretrainConfig, None, [
        f"corpus={corpus}", f"out={out}", "model.name=mednet_test", "data.image_size=32", "data.batch_size=4",
        "data.num_workers=0", "data.crop_scale=[1.0,1.0]", "data.hflip=false", f"train.epochs={EPOCHS}",
        "train.precision=fp32",
        "train.progress=false", "train.log_every_steps=1", "optim.lr=0.005", "optim.warmup_epochs=0",
        "monitor.k=3", "train.checkpoint_every_steps=2",  # rank 0 monitors; step checkpoints gather RNGs
    ])


def _worker(rank: int, port: int, corpus: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from openmednet.engine.distributed import DistEnv
    from openmednet.engine.pretrain import run_pretraining
    from openmednet.engine.trainer import evaluate

    dist = DistEnv.from_env(device="cpu")
    module, loader = _eval_setup(Path(corpus), WORLD, rank)
    metrics = evaluate(module, loader, pretrain_loss, dist=dist)
    (Path(out) / f"eval-rank{rank}.json").write_text(json.dumps({"metrics": metrics, "n": len(loader.sampler)}))

    def dump_weights(state, model) -> None:
        if state.step == steps_total[0]:
            inner = model.module  # DDP wrapper
            torch.save({k: v.detach().clone() for k, v in inner.named_parameters()}, Path(out) / f"weights-rank{rank}.pt")

    cfg = _config(Path(corpus), Path(out) / "run")
    steps_total = [EPOCHS * (24 // (4 * WORLD))]  # 24 labelled train images, batch 4 per rank
    run_pretraining(cfg, callbacks=(dump_weights,))


@pytest.fixture(scope="module")
def ddp_run(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(tiny_corpus), str(out)), nprocs=WORLD, join=True)
    return out


def test_reduced_eval_metrics_equal_single_process(ddp_run: Path, tiny_corpus: Path):
    from openmednet.engine.distributed import DistEnv
    from openmednet.engine.trainer import evaluate

    ranks = [json.loads((ddp_run / f"eval-rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # every rank gets the global value
    module, loader = _eval_setup(tiny_corpus, 1, 0)
    assert sum(r["n"] for r in ranks) == len(loader.dataset) == 12  # disjoint halves, no padding
    single = evaluate(module, loader, pretrain_loss, dist=DistEnv())
    assert ranks[0]["metrics"].keys() == single.keys()
    for k, v in single.items():
        assert ranks[0]["metrics"][k] == pytest.approx(v, rel=1e-5), k


def test_two_rank_pretraining_lowers_loss_and_keeps_ranks_identical(ddp_run: Path):
    w0 = torch.load(ddp_run / "weights-rank0.pt", weights_only=True)
    w1 = torch.load(ddp_run / "weights-rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys() and len(w0) > 50
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    records = [json.loads(line) for line in (ddp_run / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS))
    assert epochs[-1]["step"] == EPOCHS * 3
    # Light augmentation (no crop, no flip), so the 24 images are learnt: 1.69 -> 1.02 when written.
    assert epochs[-1]["train/loss"] < 0.8 * epochs[0]["train/loss"]
    assert 0.0 <= epochs[-1]["knn/top1"] <= 1.0  # the k-NN monitor ran on rank 0
    assert (ddp_run / "run" / "backbone" / "model.safetensors").is_file()
