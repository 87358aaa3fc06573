"""Fine-tuning speed: fp32 vs bf16 autocast + channels_last, per init, on one real target.

For each init, ``run_finetune`` trains ``--epochs`` epochs on PneumoniaMNIST (4,708 training
images, official split; 64 px) in fp32, then in bf16 + channels_last, and the training time of the
epochs is compared. The ratio is of whole ``run_finetune`` calls: splits, leakage checks, fp32
validation and test evaluation and writing the outputs are included (the target is decoded once,
outside the timing), so it understates the training-step speed-up. Both are measured in the same process, one
after the other, so machine drift hits both. Evaluation always runs in fp32, so the test AUROC of
the two is printed too (bf16 training should not cost accuracy). The CPU capability torch reports
and whether bf16 is native are printed with the table: without AVX512-BF16 or AMX, bf16 is emulated
and slower than fp32.

Usage::

    .venv/bin/python benchmarks/bench_finetune_precision.py                       # MedNet and Lite0, 1 epoch
    .venv/bin/python benchmarks/bench_finetune_precision.py --inits auto --epochs 2
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

DATA = Path(os.environ.get("OPENMEDNET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _run(data: Path, init: str, precision: str, epochs: int, out: Path, target) -> tuple[float, float]:
    from openmednet.eval.finetune import FinetuneConfig, run_finetune

    cfg = FinetuneConfig(data=data, out=out, init=init, epochs=epochs, patience=epochs, image_size=64, batch_size=32,
                         precision=precision, channels_last=precision != "fp32", n_boot=0)
    t0 = time.perf_counter()
    metrics = run_finetune(cfg, target).metrics
    return time.perf_counter() - t0, metrics["test"]["auroc_macro"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inits", nargs="+", default=["auto", "efficientnet_lite0"])
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    warnings.simplefilter("ignore")
    import torch

    from openmednet.engine.precision import bf16_support, cpu_capability, resolve_precision
    from openmednet.eval.targets import load_target

    data = DATA / "gray/targets/pneumoniamnist/pneumoniamnist.npz"
    if not data.is_file():
        raise SystemExit(f"{data} not found: set OPENMEDNET_SHARED_DATA to the shared data tree")
    target = load_target(data)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epoch(s), {data.name}")
    # bf16 is fast only where it is native: the table means little without the CPU it ran on.
    _, description = bf16_support("cpu")
    print(f"CPU capability {cpu_capability()}: {description}; precision 'auto' trains in "
          f"{resolve_precision('auto', 'cpu')[0]} here")
    print("| init | fp32 run (s) | bf16 + channels_last run (s) | speed-up | test AUROC fp32 / bf16 |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for init in args.inits:
            t32, auc32 = _run(data, init, "fp32", args.epochs, Path(tmp) / f"{init}-fp32", target)
            t16, auc16 = _run(data, init, "bf16", args.epochs, Path(tmp) / f"{init}-bf16", target)
            print(f"| {init} | {t32:.1f} | {t16:.1f} | {t32 / t16:.2f}x | {auc32:.4f} / {auc16:.4f} |", flush=True)


if __name__ == "__main__":
    main()
