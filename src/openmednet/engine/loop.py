"""``fit``: the one epoch loop of openmednet, for pre-training and fine-tuning alike.

The loop runs ``train_one_epoch`` (``openmednet.engine.trainer``: precision, accumulation, the
per-step LR schedule, the non-finite loss guard) epoch after epoch and hands everything else to
callbacks (``openmednet.engine.callbacks``). It knows no task: the task layer composes it::

    pre-training (engine.pretrain)    fit(..., run_dir=out, resume=..., monitor=KnnMonitor(...))
                                      -> MetricsLogger, Checkpointing, Monitor, LogEpochs
    fine-tuning (eval.finetune)       fit(..., first_epoch=1, callbacks=[EarlyStopping(val_score, patience)])
                                      -> LogEpochs, EarlyStopping (best weights restored at the end)

Semi-supervised fine-tuning (FixMatch, pseudo-label students, ``eval.semi``) and segmentation
(``eval.segmentation``) go through fine-tuning's call with their own loss and validation score.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openmednet.engine.callbacks import (
    Callback,
    Checkpointing,
    LogEpochs,
    Loop,
    MetricsLogger,
    Monitor,
    StepHook,
)
from openmednet.engine.distributed import DistEnv
from openmednet.engine.precision import resolve_precision
from openmednet.engine.trainer import (
    ComputeLoss,
    NonFiniteLossError,
    TrainState,
    train_one_epoch,
)

__all__ = ["fit"]


def fit(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    compute_loss: ComputeLoss,
    *,
    epochs: int,
    dist: DistEnv,
    run_dir: str | Path | None = None,
    scheduler: Any | None = None,
    precision: str = "fp32",
    channels_last: bool | None = False,
    grad_accum: int = 1,
    max_steps_per_epoch: int | None = None,
    clip_grad_norm: float | None = None,
    checkpoint_every_steps: int = 0,
    log_every_steps: int = 10,
    resume: bool = False,
    monitor: Callable[[nn.Module], dict[str, float]] | None = None,
    monitor_every_epochs: int = 1,
    checkpoint_meta: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback | Callable[[TrainState, nn.Module], None]] = (),
    progress: bool = False,
    tensorboard: bool = False,
    plot: bool = True,
    first_epoch: int = 0,
    convert_model: bool = True,
) -> list[dict[str, Any]]:
    """Train for ``epochs`` epochs; callbacks log, monitor, checkpoint, resume and stop early.

    With a ``run_dir`` (pre-training), every epoch rank 0 appends a record to
    ``run_dir/metrics.jsonl`` (``kind: "epoch"``, train metrics, monitor metrics prefixed
    ``knn/``...), redraws ``run_dir/loss.png`` and writes ``run_dir/checkpoint-last.pt``; every
    ``log_every_steps`` optimizer steps it appends a ``kind: "step"`` record with the loss averaged
    over all ranks since the previous one. Without one (fine-tuning), nothing is written.

    Args:
        model: module in train mode on ``dist.device``, DDP-wrapped when distributed.
        loader: training batches (a ``DataLoader`` whose sampler takes ``set_epoch``).
        optimizer: optimizer; ``scheduler`` is stepped per optimizer step.
        compute_loss: ``(model, batch) -> LossOutput``.
        epochs: total epochs of the run (a resumed run continues up to this number).
        dist: distributed environment.
        run_dir: output directory of ``metrics.jsonl``, ``loss.png`` and the checkpoint
            (``MetricsLogger``, ``Checkpointing``); ``None``: none of them.
        scheduler: per-step LR scheduler.
        precision: ``"auto"`` (bf16 where native, else fp32), ``"bf16"``, ``"fp16"`` (CUDA, with a
            ``GradScaler`` made here) or ``"fp32"``; resolved once here.
        channels_last: NHWC inputs and model (``None``: on with bf16). A plain module is converted
            here (unless ``convert_model`` is off); a DDP-wrapped one must have been converted
            before wrapping (checked), as ``run_pretraining`` does.
        grad_accum: micro-batches per optimizer step.
        max_steps_per_epoch: cap on optimizer steps per epoch (smoke runs, benchmarks).
        clip_grad_norm: gradient-norm clipping.
        checkpoint_every_steps: with ``run_dir``, also checkpoint every N optimizer steps
            (mid-epoch resume); 0 = only at epoch ends.
        log_every_steps: with ``run_dir``, the step-record interval (0 = epoch records only).
        resume: with ``run_dir``, continue from ``run_dir/checkpoint-last.pt`` when it exists.
        monitor: ``model -> metrics`` run by rank 0 after an epoch (e.g. ``KnnMonitor``); other
            ranks may pass ``None``.
        monitor_every_epochs: run the monitor every N epochs (and after the last).
        checkpoint_meta: plain-typed entries stored in every checkpoint (``model_name``,
            ``model_args``, ``config``, ``extra``).
        callbacks: more ``Callback`` objects (``EarlyStopping``...), after the ones above; a plain
            function is called after every optimizer step (after any step checkpoint) with the
            ``TrainState`` and the model (DDP-wrapped when distributed).
        progress: progress bars on rank 0.
        tensorboard: with ``run_dir``, also log to ``run_dir/tensorboard`` (needs ``tensorboard``).
        plot: with ``run_dir``, redraw ``loss.png`` after each epoch.
        first_epoch: number of the first epoch (fine-tuning counts from 1, as its history does);
            the sampler's order is seeded by the epoch number.
        convert_model: with ``channels_last``, convert a plain module to NHWC. Fine-tuning turns it
            off: it has always fed NHWC inputs to its NCHW weights, and converting them changes its
            results in the last bits (measured: validation losses from the 5th digit).

    Returns:
        The epoch records of this call (resumed epochs only): ``epoch``, ``step``, ``train/<metric>``
        (``train_one_epoch``'s), the callbacks' entries, ``time_s``.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the weights were not updated with it, and the
            message says what the callbacks know (e.g. where the last good checkpoint is).
        ValueError: ``channels_last`` with a DDP-wrapped model in NCHW layout, or a mid-epoch resume
            with another world size, batch size or ``grad_accum`` than the checkpoint's.
    """
    precision, channels_last = resolve_precision(precision, dist.device, channels_last)
    scaler = torch.amp.GradScaler(dist.device.type) if precision == "fp16" else None
    if channels_last and convert_model:
        _to_channels_last(model)
    standard: list[Callback] = []
    if run_dir is not None:  # the log before the checkpoint: a record is on disk before the checkpoint after it
        standard += [MetricsLogger(run_dir, log_every_steps, tensorboard, plot),
                     Checkpointing(run_dir, resume, checkpoint_every_steps, checkpoint_meta)]
    if monitor is not None:
        standard.append(Monitor(monitor, monitor_every_epochs))
    standard.append(LogEpochs())
    cbs = standard + [cb if isinstance(cb, Callback) else StepHook(cb) for cb in callbacks]
    loop = Loop(model=model, loader=loader, optimizer=optimizer, scheduler=scheduler, scaler=scaler, dist=dist,
                grad_accum=grad_accum, max_steps_per_epoch=max_steps_per_epoch, end_epoch=first_epoch + epochs,
                state=TrainState(epoch=first_epoch))

    def on_step(_: TrainState) -> None:
        for cb in cbs:
            cb.on_step(loop)

    try:
        for cb in cbs:
            cb.restore(loop)
        for cb in cbs:
            cb.on_fit_start(loop)
        for epoch in range(loop.state.epoch, loop.end_epoch):
            resumed = loop.batches is not None  # a mid-epoch resume arrives with its iterator
            if not resumed:
                loop.state.reset_epoch(epoch)
            for cb in cbs:
                cb.on_epoch_start(loop, resumed)
            t0 = time.perf_counter()
            train_metrics = train_one_epoch(
                model, loader, optimizer, compute_loss, epoch=epoch, dist=dist, scheduler=scheduler,
                scaler=scaler, precision=precision, channels_last=channels_last, grad_accum=grad_accum,
                max_steps=max_steps_per_epoch, clip_grad_norm=clip_grad_norm, progress=progress,
                state=loop.state, batches=loop.batches, on_step=on_step,
            )
            loop.batches = None
            record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": loop.state.step}
            record.update({f"train/{k}": v for k, v in train_metrics.items()})
            # Only rank 0 holds a monitor (the others pass None); they wait for it in the next
            # collective (the checkpoint's gather), so no barrier that only some ranks would reach.
            for cb in cbs:
                cb.on_epoch_end(loop, record)
            record["time_s"] = time.perf_counter() - t0
            loop.history.append(record)
            for cb in cbs:
                cb.on_record(loop, record)
            if loop.stop:
                break
        for cb in cbs:
            cb.on_fit_end(loop)
    except NonFiniteLossError as e:
        notes = [note for cb in cbs if (note := cb.on_nonfinite(loop))]
        raise NonFiniteLossError(". ".join([str(e), *notes])) from None
    finally:
        for cb in cbs:
            cb.teardown(loop)
    dist.barrier()
    return loop.history


def _to_channels_last(model: nn.Module) -> None:
    """Convert a plain module to NHWC; only check a DDP-wrapped one (DDP lays out its gradient
    buckets when it wraps, so the conversion must come before, as in ``run_pretraining``)."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        model.to(memory_format=torch.channels_last)
        return
    nchw = [n for n, p in model.module.named_parameters() if p.ndim == 4 and not p.is_contiguous(memory_format=torch.channels_last)]
    if nchw:
        raise ValueError(
            f"channels_last=True but the DDP-wrapped model has {len(nchw)} 4-D parameter(s) in NCHW layout "
            f"(e.g. '{nchw[0]}'): convert before wrapping, module.to(memory_format=torch.channels_last), "
            "then dist.wrap_model(module)"
        )
