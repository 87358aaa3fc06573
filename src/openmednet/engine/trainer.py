"""The training step: one code path for one CPU process and for many DDP processes on GPU nodes.

In the style of torchvision's reference scripts:

- ``train_one_epoch``: mixed precision (bf16 autocast on CPU, bf16/fp16 on GPU; ``auto`` picks bf16
  where the hardware runs it natively, see ``openmednet.engine.precision``), ``channels_last``,
  gradient accumulation (with DDP's ``no_sync`` between micro-batches), a per-step LR schedule,
  non-finite loss detection agreed by all ranks, metrics reduced across ranks.
- ``evaluate``: the same metrics in eval mode without gradients.

The epoch loop over them is ``openmednet.engine.loop.fit``, the one loop of pre-training and
fine-tuning; what a run does besides its steps (``metrics.jsonl``, checkpoints, the transfer
monitor, early stopping) are its callbacks, ``openmednet.engine.callbacks``.

The loss is a function ``compute_loss(model, batch) -> LossOutput``: the loop knows nothing about
objectives, so supervised, self-supervised and fine-tuning losses share it.

Exact resume (``callbacks.Checkpointing``): the sampler's order is a function of ``(seed, epoch)``
(and, for openmednet's datasets, so is each position's augmentation seed, see
``openmednet.data.loader``), and the global Python / NumPy / torch RNG states are checkpointed, so a resumed run replays the same batches, augmentations
and dropout masks. A mid-epoch resume restores the global RNG states of the epoch start, replays the
data order by fetching (not training on) the batches already seen (with ``num_workers=0``, the
transforms of datasets without seeded keys draw from the global torch RNG: the fetch replays those
draws), then restores the RNG states of the checkpoint. The DataLoader itself does not draw from
the global RNG: it takes its workers' base seed from ``loader.generator`` (``build_loader`` seeds it
from ``(seed, rank)``), which is not checkpointed, so a dataset without seeded keys loaded by
workers resumes correctly but not bit for bit. A mid-epoch position is counted in batches, so a
mid-epoch resume needs the checkpoint's world size, per-rank batch size and gradient accumulation
(checked); an epoch-boundary resume may change them. Fetching costs data loading only; on GPUs with
large corpora prefer epoch-boundary checkpoints plus a few step checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from openmednet.engine.distributed import DistEnv
from openmednet.engine.precision import PRECISIONS, resolve_precision

__all__ = [
    "PRECISIONS",
    "LossOutput",
    "NonFiniteLossError",
    "TrainState",
    "autocast",
    "current_lr",
    "evaluate",
    "set_loader_epoch",
    "to_device",
    "train_one_epoch",
]

log = logging.getLogger(__name__)


@dataclass
class LossOutput:
    """What ``compute_loss`` returns for one micro-batch.

    Attributes:
        loss: scalar to minimise (mean over the micro-batch).
        n: samples behind the loss (its weight when averaging over batches and ranks).
        metrics: more per-batch means to report (``float`` or 0-d tensors), e.g. the supervised and
            SSL parts of a combined loss; ``"loss"`` is added by the loop.
    """

    loss: Tensor
    n: int
    metrics: dict[str, float | Tensor] = field(default_factory=dict)


ComputeLoss = Callable[[nn.Module, Any], LossOutput]


@dataclass
class TrainState:
    """Where a run is: saved in checkpoints, restored on resume.

    Attributes:
        epoch: epoch in progress (or next to run when ``batch_in_epoch == 0``).
        step: optimizer steps since the start of the run.
        batch_in_epoch: batches of ``epoch`` already trained on.
        sums: metric sums (``metric * n``) over the batches of ``epoch`` so far, on this rank.
        count: samples behind ``sums`` on this rank.
    """

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    count: float = 0.0

    def reset_epoch(self, epoch: int) -> None:
        """Start ``epoch`` with empty metric sums."""
        self.epoch, self.batch_in_epoch, self.sums, self.count = epoch, 0, {}, 0.0


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the weights were not updated with it."""


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` on ``device``.

    ``auto`` is ``bf16`` where ``device`` runs bf16 natively, else ``fp32``
    (``openmednet.engine.precision.resolve_precision``); ``bf16`` runs on CPU (oneDNN bf16 kernels)
    and GPU; ``fp16`` needs CUDA (and a ``GradScaler``); ``fp32`` disables autocast.

    Raises:
        KeyError: unknown precision.
        ValueError: ``fp16`` on CPU (CPU fp16 kernels are slow and unscaled; use bf16).
    """
    precision, _ = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor of a (nested) batch to ``device``; 4-D float tensors go ``channels_last``."""
    if isinstance(batch, Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader's sampler / batch sampler when they have one."""
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def _metric_values(out: LossOutput) -> dict[str, float]:
    values = {"loss": out.loss.detach().float().item()}
    for k, v in out.metrics.items():
        values[k] = float(v.detach().float().item()) if isinstance(v, Tensor) else float(v)
    return values


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """Learning rate of the body parameter group (the schedule's; head groups are multiples of it)."""
    for g in optimizer.param_groups:
        if g.get("lr_mult", 1.0) == 1.0:
            return float(g["lr"])
    return float(optimizer.param_groups[0]["lr"])


def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    compute_loss: ComputeLoss,
    *,
    epoch: int,
    dist: DistEnv,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    precision: str = "fp32",
    channels_last: bool | None = False,
    grad_accum: int = 1,
    max_steps: int | None = None,
    clip_grad_norm: float | None = None,
    progress: bool = False,
    state: TrainState | None = None,
    batches: Iterator[Any] | None = None,
    on_step: Callable[[TrainState], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` for one epoch (or ``max_steps`` optimizer steps) and return averaged metrics.

    Args:
        model: module in train mode (DDP-wrapped when distributed), already on ``dist.device``.
        loader: iterable of batches; its sampler's ``set_epoch`` is called unless ``batches`` is given.
        optimizer: optimizer of ``model``'s parameters.
        compute_loss: ``(model, batch) -> LossOutput`` for one micro-batch.
        epoch: epoch number (sampler seeding, progress bar).
        dist: distributed environment; metrics are reduced over its ranks.
        scheduler: stepped once per optimizer step.
        scaler: ``GradScaler`` for fp16 (``None`` otherwise).
        precision: ``"auto"``, ``"bf16"``, ``"fp16"`` (CUDA only) or ``"fp32"``. The loop's default
            stays ``fp32`` (bit-exact tests on any machine); configs default to ``auto``.
        channels_last: feed 4-D inputs in NHWC memory format (faster convolutions with oneDNN/cuDNN);
            ``None`` follows the resolved precision (on with bf16).
        grad_accum: micro-batches per optimizer step (effective batch = batch x grad_accum x world).
        max_steps: stop after this many optimizer steps in this epoch.
        clip_grad_norm: clip the global gradient norm to this value.
        progress: show a progress bar (rank 0 only).
        state: run state, updated in place (step counters, metric sums); a fresh one if ``None``.
        batches: an iterator already positioned mid-epoch (resume); defaults to ``iter(loader)``.
        on_step: called with ``state`` after every optimizer step (checkpoints, monitoring).

    Returns:
        Per-sample means over the epoch and over all ranks: ``loss`` and every metric of
        ``LossOutput.metrics``, plus ``lr`` (at the end) and ``images_per_s`` (all ranks).

    A last accumulation group shorter than ``grad_accum`` (the batches ran out) is a full optimizer
    step: its gradients are rescaled to the mean over its micro-batches, and the scheduler,
    progress bar and ``on_step`` run as after any step.

    Raises:
        NonFiniteLossError: a rank's loss was NaN/inf; all ranks raise at the same step, before the
            optimizer step, so the weights stay finite.
        ValueError: ``grad_accum < 1``, or ``precision="fp16"`` without a ``scaler``.
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if precision == "fp16" and scaler is None:
        raise ValueError(
            "precision 'fp16' needs a GradScaler (scaler=torch.amp.GradScaler('cuda')): fp16 gradients "
            "underflow without loss scaling; or use precision 'bf16'"
        )
    precision, channels_last = resolve_precision(precision, dist.device, channels_last)
    state = state if state is not None else TrainState(epoch=epoch)
    state.epoch = epoch
    if batches is None:
        set_loader_epoch(loader, epoch)
        batches = iter(loader)
    model.train()
    try:
        total = math.ceil(len(loader) / grad_accum)
    except TypeError:
        total = None
    if max_steps is not None:
        total = min(total, max_steps) if total is not None else max_steps
    bar = _progress_bar(total, state.batch_in_epoch // grad_accum, f"epoch {epoch}", progress and dist.is_main)
    steps_done = state.batch_in_epoch // grad_accum
    samples, t0 = 0.0, time.perf_counter()
    micro = 0
    optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        if max_steps is not None and steps_done >= max_steps:
            break
        micro += 1
        last_micro = micro == grad_accum
        batch = to_device(batch, dist.device, channels_last)
        # DDP all-reduces gradients on every backward; skip it on all but the last micro-batch.
        sync = model.no_sync() if (dist.is_distributed and not last_micro and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync:
            with autocast(dist.device, precision):
                out = compute_loss(model, batch)
            values = _metric_values(out)
            # One small all-reduce: every rank learns whether any rank's loss went non-finite.
            bad = dist.all_reduce_sum(torch.tensor([0.0 if math.isfinite(values["loss"]) else 1.0], device=dist.device))
            if bad.item() > 0:
                if bar is not None:
                    bar.close()
                raise NonFiniteLossError(
                    f"loss is {values['loss']} on rank {dist.rank} (non-finite on {int(bad.item())} of "
                    f"{dist.world_size} ranks) at epoch {epoch}, batch {state.batch_in_epoch}, step {state.step}"
                )
            loss = out.loss / grad_accum
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        for k, v in values.items():
            state.sums[k] = state.sums.get(k, 0.0) + v * out.n
        state.count += out.n
        samples += out.n
        state.batch_in_epoch += 1
        if last_micro:
            _optimizer_step(model, optimizer, scaler, clip_grad_norm)
            micro = 0
            steps_done += 1
            _after_step(state, optimizer, scheduler, bar, values["loss"], on_step)
    if micro > 0:  # a last partial accumulation: step on what was accumulated rather than drop it
        if dist.is_distributed:
            # Its backward passes ran under no_sync: all-reduce the gradients by hand.
            _all_reduce_grads(model, dist)
        # Each micro-loss was divided by grad_accum, but only ``micro`` were summed: rescale to their
        # mean, so this step is as large as a full group's (before clipping, which sees true norms).
        _scale_grads(model, grad_accum / micro)
        _optimizer_step(model, optimizer, scaler, clip_grad_norm)
        steps_done += 1
        _after_step(state, optimizer, scheduler, bar, values["loss"], on_step)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    metrics = dist.reduce_metrics(state.sums, state.count)
    rate = dist.all_reduce_sum(torch.tensor([samples], dtype=torch.float64, device=dist.device)).item()
    metrics["images_per_s"] = rate / max(elapsed, 1e-9)
    metrics["lr"] = current_lr(optimizer)
    return metrics


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, clip: float | None) -> None:
    if scaler is not None:
        if clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _after_step(
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    bar: Any,
    loss: float,
    on_step: Callable[[TrainState], None] | None,
) -> None:
    # Everything that follows an optimizer step, full group or last partial one alike.
    state.step += 1
    if scheduler is not None:
        scheduler.step()
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{current_lr(optimizer):.2e}")
    if on_step is not None:
        on_step(state)


def _scale_grads(model: nn.Module, factor: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def _all_reduce_grads(model: nn.Module, dist: DistEnv) -> None:
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce_sum(p.grad)
            p.grad /= dist.world_size


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    compute_loss: ComputeLoss,
    *,
    dist: DistEnv,
    precision: str = "fp32",
    channels_last: bool = False,
    max_steps: int | None = None,
) -> dict[str, float]:
    """Per-sample means of ``compute_loss``'s metrics over ``loader`` in eval mode, reduced over ranks.

    Every sample must be seen by exactly one rank for exact numbers: ``build_loader(...,
    shuffle=False)`` (``build_sampler``) never pads evaluation, so ranks may hold different numbers
    of samples and batches, which is fine here (the only collectives come after the loop). Pass the
    unwrapped module, not a DDP wrapper: DDP's forward broadcasts buffers, a collective that ranks
    with different batch counts would not match. A rank whose share is empty (fewer samples than
    ranks) reports nothing and takes the metric names of the others.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0.0
    for i, batch in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            break
        batch = to_device(batch, dist.device, channels_last)
        with autocast(dist.device, precision):
            out = compute_loss(model, batch)
        for k, v in _metric_values(out).items():
            sums[k] = sums.get(k, 0.0) + v * out.n
        count += out.n
    model.train(was_training)
    if dist.is_distributed:
        # reduce_metrics needs the same keys on every rank; an empty rank has none of its own.
        names = [k for k in dist.all_gather_object(sorted(sums) if count > 0 else None) if k is not None]
        if count == 0 and names:
            sums = dict.fromkeys(names[0], 0.0)
    return dist.reduce_metrics(sums, count)
