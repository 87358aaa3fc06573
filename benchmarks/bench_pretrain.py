"""Pre-training throughput: one process vs two DDP processes on the same cores, as a fraction of a
bf16 matmul measured in the same run.

Each row runs the real training step of ``openmednet pretrain`` (``engine.trainer.train_one_epoch``
on a ``PretrainModule``: MedNet backbone + objective heads, AdamW, per-step schedule) over real
images of ../shared/data held in memory, so it measures the engine and the model, not disk or JPEG
decoding (``bench_loader.py`` measures the loader). Rows:

    1 proc x 1 thread     the reference: one core
    1 proc x 2 threads    the plain ``python`` run using both cores (intra-op threads)
    2 DDP x 1 thread      ``torchrun --nproc_per_node 2`` on the same two cores (gloo all-reduce)

each in ``fp32`` (NCHW) and ``bf16cl`` (bf16 autocast + channels_last). The global batch is the same
in every row (``--batch``; each DDP rank takes half). FLOPs per image come from
``torch.utils.flop_counter`` on one forward + backward of the module; achieved FLOP/s = FLOPs per
image x images/s, divided by a bf16 ``2048^3`` matmul on both cores measured right before the row.

Usage::

    python benchmarks/bench_pretrain.py                               # mednet_gray, 64 px, ~3 min
    python benchmarks/bench_pretrain.py --objective simclr --out bench_pretrain.md
    python benchmarks/bench_pretrain.py --flops-only --size 224 --model mednet_color
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from _common import MatmulReference, count_flops, environment, markdown_table
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import openmednet
from openmednet.engine.distributed import DistEnv
from openmednet.engine.optim import build_optimizer, build_scheduler
from openmednet.engine.pretrain import PretrainModule, SupervisedHeads, pretrain_loss
from openmednet.engine.trainer import train_one_epoch
from openmednet.utils import atomic_write_text

SHARED = Path(os.environ.get("OPENMEDNET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SOURCE = {1: "gray/pretrain/brain_tumor_mri", 3: "color/pretrain/pbc_blood_cells"}
MODES = {"fp32": ("fp32", False), "bf16cl": ("bf16", True)}
LAYOUTS = ("1 proc x 1 thread", "1 proc x 2 threads", "2 DDP x 1 thread")


class InMemoryImages(Dataset):
    """Real images decoded once, normalised to ``(C, S, S)`` float (mean 0.5, std 0.25), with labels.

    For ``views=2`` an item is ``[image, flipped image]`` (a cheap stand-in for SimCLR's views, so
    the step does the two-view forward without augmentation cost).
    """

    def __init__(self, channels: int, size: int, count: int, views: int):
        folder = SHARED / SOURCE[channels]
        with open(folder / "labels.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["label"]][:count]
        if len(rows) < count:
            raise FileNotFoundError(f"need {count} labelled images in {folder}, found {len(rows)}")
        names = sorted({r["label"] for r in rows})
        mode = "L" if channels == 1 else "RGB"
        arrays = []
        for r in rows:
            with Image.open(folder / r["path"]) as im:
                arrays.append(np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.float32))
        x = torch.from_numpy(np.stack(arrays)) / 255.0
        x = x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)
        self.images = ((x - 0.5) / 0.25).contiguous()
        self.labels = torch.tensor([names.index(r["label"]) for r in rows])
        self.label_names = [f"bench/{n}" for n in names]
        self.views = views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        image = [x, x.flip(-1)] if self.views == 2 else x
        return image, self.labels[i], 0


def build(args: argparse.Namespace, dataset: InMemoryImages, dist: DistEnv, channels_last: bool):
    """Module (DDP-wrapped when distributed), optimizer, scheduler for one benchmark row."""
    torch.manual_seed(0)
    backbone = openmednet.create_model(args.model, num_classes=0)
    ssl = None
    if args.objective == "simclr":
        from openmednet.ssl import SimCLRObjective

        ssl = SimCLRObjective(backbone.num_features, gather_distributed=dist.is_distributed)
    sup = SupervisedHeads(backbone.num_features, dataset.label_names) if args.objective == "supervised" else None
    module = PretrainModule(backbone, sup, ssl)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    model = dist.wrap_model(module)
    opt = build_optimizer(module, "adamw", lr=1e-3)
    return model, opt, build_scheduler(opt, total_steps=10_000, warmup_steps=10)


def run_row(args: argparse.Namespace, dist: DistEnv, mode: str) -> float:
    """Global images/s of ``args.steps`` timed training steps after ``args.warmup`` untimed ones."""
    precision, channels_last = MODES[mode]
    views = 2 if args.objective == "simclr" else 1
    dataset = InMemoryImages(args.channels, args.size, args.images, views)
    per_rank = args.batch // dist.world_size
    sampler = torch.utils.data.DistributedSampler(dataset, dist.world_size, dist.rank, seed=0) if dist.is_distributed else None
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, shuffle=sampler is None, drop_last=True)
    model, opt, sched = build(args, dataset, dist, channels_last)
    kw = {"dist": dist, "scheduler": sched, "precision": precision, "channels_last": channels_last}
    train_one_epoch(model, loader, opt, pretrain_loss, epoch=0, max_steps=args.warmup, **kw)
    rates = []
    for epoch in range(1, 1 + args.repeats):
        metrics = train_one_epoch(model, loader, opt, pretrain_loss, epoch=epoch, max_steps=args.steps, **kw)
        rates.append(metrics["images_per_s"])
    return float(np.median(rates))


def _ddp_worker(rank: int, port: int, args: argparse.Namespace, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist = DistEnv.from_env(device="cpu")
    rate = run_row(args, dist, mode)
    if dist.is_main:
        Path(out).write_text(str(rate))
    dist.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flops_per_image(args: argparse.Namespace) -> float:
    """Forward + backward FLOPs of the pre-training module, per image (fp32 graph)."""
    views = 2 if args.objective == "simclr" else 1
    dataset = InMemoryImages(args.channels, args.size, 8, views)
    model, _, _ = build(args, dataset, DistEnv(), channels_last=False)
    batch = next(iter(DataLoader(dataset, batch_size=8)))

    def step() -> None:
        pretrain_loss(model, batch).loss.backward()

    return count_flops(step) / 8


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mednet_gray")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="global batch (each DDP rank takes half)")
    p.add_argument("--images", type=int, default=512, help="real images held in memory")
    p.add_argument("--objective", default="supervised", choices=("supervised", "simclr"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per repeat")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default="fp32,bf16cl")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    p.add_argument("--flops-only", action="store_true", help="print the training FLOPs per image and exit")
    args = p.parse_args(argv)
    args.channels = 3 if "color" in args.model else 1
    modes = args.modes.split(",")

    torch.set_num_threads(2)
    ref = MatmulReference(dtype=torch.bfloat16)
    flops = flops_per_image(args)
    if args.flops_only:
        print(f"{args.model} {args.size} px {args.objective}: {flops / 1e9:.3f} GFLOP per image (forward + backward)")
        return
    rows = []
    for mode in modes:
        for layout in LAYOUTS:
            torch.set_num_threads(2)
            peak = ref.measure()
            t0 = time.perf_counter()
            if layout.startswith("1 proc"):
                torch.set_num_threads(int(layout.split(" x ")[1][0]))
                rate = run_row(args, DistEnv(), mode)
                torch.set_num_threads(2)
            else:
                out = Path(f"/tmp/bench_pretrain_{os.getpid()}.txt")
                mp.spawn(_ddp_worker, args=(_free_port(), args, mode, str(out)), nprocs=2, join=True)
                rate = float(out.read_text())
                out.unlink()
            achieved = rate * flops
            rows.append([layout, mode, f"{rate:.1f}", f"{achieved / 1e9:.1f}", f"{peak / 1e9:.0f}",
                         f"{achieved / peak:.3f}", f"{time.perf_counter() - t0:.0f}"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    table = markdown_table(
        ["layout", "mode", "images/s", "achieved GFLOP/s", "bf16 matmul GFLOP/s", "fraction of matmul", "row s"], rows
    )
    rate_of = {(r[0], r[1]): float(r[2]) for r in rows}
    ratios = ", ".join(
        f"{m}: {rate_of[('2 DDP x 1 thread', m)] / rate_of[('1 proc x 2 threads', m)]:.2f} "
        f"(vs 1 thread: {rate_of[('2 DDP x 1 thread', m)] / rate_of[('1 proc x 1 thread', m)]:.2f})"
        for m in modes
    )
    command = " ".join(["python benchmarks/bench_pretrain.py", *(argv if argv is not None else sys.argv[1:])])
    report = "\n".join([
        f"`{command}`",
        "",
        (f"{args.model}, {args.size} px, objective {args.objective}, global batch {args.batch}, "
         f"{flops / 1e9:.3f} GFLOP per image (forward + backward); {environment()}"),
        "",
        table,
        "",
        f"images/s of 2 DDP ranks / 1 process with 2 threads: {ratios}",
    ])
    print(report)
    if args.out is not None:
        atomic_write_text(args.out, report + "\n")


if __name__ == "__main__":
    main()
