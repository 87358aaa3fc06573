"""The training loop: one code path for one CPU process and for many DDP processes on GPU nodes.

Three functions, in the style of torchvision's reference scripts:

- ``train_one_epoch``: mixed precision (bf16 autocast on CPU, bf16/fp16 on GPU; ``auto`` picks bf16
  where the hardware runs it natively, see ``openmednet.engine.precision``), ``channels_last``,
  gradient accumulation (with DDP's ``no_sync`` between micro-batches), a per-step LR schedule,
  non-finite loss detection agreed by all ranks, metrics reduced across ranks.
- ``evaluate``: the same metrics in eval mode without gradients.
- ``fit``: epochs, ``metrics.jsonl``, the loss-curve plot, a transfer monitor, atomic checkpoints
  (each epoch and optionally every N steps) and exact resume, including from a mid-epoch
  checkpoint of a run killed with SIGKILL.

The loss is a function ``compute_loss(model, batch) -> LossOutput``: the loop knows nothing about
objectives, so supervised, self-supervised and fine-tuning losses share it.

Exact resume: the sampler's order is a function of ``(seed, epoch)`` (and, for openmednet's datasets,
so is each position's augmentation seed, see ``openmednet.data.loader``), and the global Python /
NumPy / torch RNG states are checkpointed, so a resumed run replays the same batches, augmentations
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
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from openmednet.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from openmednet.engine.distributed import DistEnv, unwrap_model
from openmednet.engine.precision import PRECISIONS, resolve_precision
from openmednet.utils import atomic_write_text

__all__ = [
    "PRECISIONS",
    "LossOutput",
    "NonFiniteLossError",
    "TrainState",
    "autocast",
    "evaluate",
    "fit",
    "train_one_epoch",
]

log = logging.getLogger(__name__)

CHECKPOINT_LAST = "checkpoint-last.pt"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


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


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    # The body group (lr_mult 1) carries the schedule's lr; head groups are multiples of it.
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
    metrics["lr"] = _current_lr(optimizer)
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
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{_current_lr(optimizer):.2e}")
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


# ------------------------------------------------------------------------------------------ fit
class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) plus an optional TensorBoard writer, rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ModuleNotFoundError as e:
                raise ModuleNotFoundError(
                    "tensorboard logging was requested but the package is missing: pip install tensorboard"
                ) from e
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate(self, before_step: int) -> None:
        """Drop records at or after global step ``before_step`` (they are replayed on resume).

        A line that is not a complete record (a run killed in the middle of an append) is dropped
        with a warning (``read_metrics``).
        """
        if not self.enabled or not self.path.is_file():
            return
        from openmednet.engine.plots import read_metrics

        keep = [r for r in read_metrics(self.path) if r.get("step", before_step) < before_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (must hold ``step``)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Flush the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()


def fit(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    compute_loss: ComputeLoss,
    *,
    epochs: int,
    dist: DistEnv,
    run_dir: str | Path,
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
    callbacks: Sequence[Callable[[TrainState, nn.Module], None]] = (),
    progress: bool = False,
    tensorboard: bool = False,
    plot: bool = True,
) -> list[dict[str, float]]:
    """Train for ``epochs`` epochs with logging, monitoring, checkpoints and exact resume.

    Every epoch, rank 0 appends a record to ``run_dir/metrics.jsonl`` (``kind: "epoch"``, train
    metrics, monitor metrics prefixed ``knn/``...), redraws ``run_dir/loss.png`` and writes
    ``run_dir/checkpoint-last.pt``; every ``log_every_steps`` optimizer steps it appends a
    ``kind: "step"`` record with the loss averaged over all ranks since the previous one.

    Args:
        model: module in train mode on ``dist.device``, DDP-wrapped when distributed.
        loader: training batches (a ``DataLoader`` whose sampler takes ``set_epoch``).
        optimizer: optimizer; ``scheduler`` is stepped per optimizer step.
        compute_loss: ``(model, batch) -> LossOutput``.
        epochs: total epochs of the run (a resumed run continues up to this number).
        dist: distributed environment.
        run_dir: output directory (created).
        scheduler: per-step LR scheduler.
        precision: ``"auto"`` (bf16 where native, else fp32), ``"bf16"``, ``"fp16"`` (CUDA, with a
            ``GradScaler`` made here) or ``"fp32"``; resolved once here.
        channels_last: NHWC inputs and model (``None``: on with bf16). A plain module is converted
            here; a DDP-wrapped one must have been converted before wrapping (checked), as
            ``run_pretraining`` does.
        grad_accum: micro-batches per optimizer step.
        max_steps_per_epoch: cap on optimizer steps per epoch (smoke runs, benchmarks).
        clip_grad_norm: gradient-norm clipping.
        checkpoint_every_steps: also checkpoint every N optimizer steps (mid-epoch resume); 0 = only
            at epoch ends. The epoch's last step is skipped: the epoch-end checkpoint follows it.
        log_every_steps: step-record interval (0 = epoch records only).
        resume: continue from ``run_dir/checkpoint-last.pt`` when it exists.
        monitor: ``model -> metrics`` run by rank 0 after an epoch (e.g. ``KnnMonitor``); other ranks
            may pass ``None``.
        monitor_every_epochs: run the monitor every N epochs (and after the last).
        checkpoint_meta: plain-typed entries stored in every checkpoint (``model_name``,
            ``model_args``, ``config``, ``extra``).
        callbacks: called after every optimizer step (after any step checkpoint) with the
            ``TrainState`` and the model (DDP-wrapped when distributed).
        progress: progress bars on rank 0.
        tensorboard: also log to ``run_dir/tensorboard`` (needs the ``tensorboard`` package).
        plot: redraw ``loss.png`` after each epoch.

    Returns:
        The epoch records of this call (resumed epochs only).

    Raises:
        NonFiniteLossError: the loss became NaN/inf; ``checkpoint-last.pt`` is left as the last good
            checkpoint and the message says where it is.
        ValueError: ``channels_last`` with a DDP-wrapped model in NCHW layout, or a mid-epoch resume
            with another world size, batch size or ``grad_accum`` than the checkpoint's.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_LAST
    meta = dict(checkpoint_meta or {})
    precision, channels_last = resolve_precision(precision, dist.device, channels_last)
    scaler = torch.amp.GradScaler(dist.device.type) if precision == "fp16" else None
    if channels_last:
        _to_channels_last(model)
    layout = {"world_size": dist.world_size, "batch_size": _loader_batch_size(loader), "grad_accum": grad_accum}
    steps_per_epoch = _steps_per_epoch(loader, grad_accum, max_steps_per_epoch)
    metrics_log = MetricsLog(run_dir, enabled=dist.is_main, tensorboard=tensorboard)
    state = TrainState()
    rng_epoch_start = None
    batches = None
    if resume and ckpt_path.is_file():
        state, rng_epoch_start, batches = _resume(ckpt_path, model, optimizer, scheduler, scaler, loader, dist, layout)
        metrics_log.truncate(before_step=state.step + 1)
    elif dist.is_main:
        metrics_log.truncate(before_step=0)  # a fresh run starts a fresh log

    log_sum = torch.zeros(2, dtype=torch.float64)  # loss * n, n since the last step record

    def save(st: TrainState, mid_epoch: bool) -> None:
        # Collectives first (every rank takes part), then rank 0 writes. Each rank's RNG streams are
        # kept, so a resumed DDP run gives each rank its own augmentation stream back.
        rng_per_rank = dist.all_gather_object(
            {"rng": capture_rng_state(), "rng_epoch_start": rng_epoch_start if mid_epoch else None}
        )
        extra = {
            **meta.get("extra", {}),
            "train_state": {**_state_for_checkpoint(st, dist, mid_epoch), **layout},
            "rng_per_rank": rng_per_rank,
        }
        save_checkpoint(
            ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            epoch=st.epoch if mid_epoch else st.epoch + 1, step=st.step,
            batch_in_epoch=st.batch_in_epoch if mid_epoch else 0,
            rng_epoch_start=rng_epoch_start if mid_epoch else None, dist=dist,
            model_name=meta.get("model_name"), model_args=meta.get("model_args"),
            config=meta.get("config"), extra=extra,
        )

    def on_step(st: TrainState) -> None:
        loss_n = torch.tensor([st.sums.get("loss", 0.0), st.count], dtype=torch.float64)
        if log_every_steps and st.step % log_every_steps == 0:
            delta = dist.reduce_metrics({"loss": (loss_n - log_sum)[0].item()}, (loss_n - log_sum)[1].item())
            metrics_log.write({"kind": "step", "epoch": st.epoch, "step": st.step, "train/loss": delta["loss"],
                               "lr": _current_lr(optimizer)})
            log_sum.copy_(loss_n)
        # Not on the epoch's last step: the epoch-end checkpoint follows (after the monitor), and a
        # "mid-epoch" one there would resume into an exhausted epoch.
        last_of_epoch = steps_per_epoch is not None and math.ceil(st.batch_in_epoch / grad_accum) >= steps_per_epoch
        if checkpoint_every_steps and st.step % checkpoint_every_steps == 0 and not last_of_epoch:
            save(st, mid_epoch=True)
        for cb in callbacks:
            cb(st, model)

    history = []
    try:
        for epoch in range(state.epoch, epochs):
            if batches is None:  # a fresh epoch (a mid-epoch resume arrives with its iterator)
                state.reset_epoch(epoch)
                log_sum.zero_()
                rng_epoch_start = capture_rng_state()
            else:
                log_sum.copy_(torch.tensor([state.sums.get("loss", 0.0), state.count], dtype=torch.float64))
            t0 = time.perf_counter()
            train_metrics = train_one_epoch(
                model, loader, optimizer, compute_loss, epoch=epoch, dist=dist, scheduler=scheduler,
                scaler=scaler, precision=precision, channels_last=channels_last, grad_accum=grad_accum,
                max_steps=max_steps_per_epoch, clip_grad_norm=clip_grad_norm, progress=progress,
                state=state, batches=batches, on_step=on_step,
            )
            batches = None
            record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": state.step}
            record.update({f"train/{k}": v for k, v in train_metrics.items()})
            last = epoch == epochs - 1
            # Only rank 0 holds a monitor (the others pass None); they wait for it in the next
            # collective (the checkpoint's gather), so no barrier that only some ranks would reach.
            if dist.is_main and monitor is not None and ((epoch + 1) % monitor_every_epochs == 0 or last):
                record.update(monitor(unwrap_model(model)))
            record["time_s"] = time.perf_counter() - t0
            history.append(record)
            metrics_log.write(record)
            if dist.is_main:
                log.info("epoch %d: %s", epoch, _format_record(record))
                if plot:
                    from openmednet.engine.plots import plot_loss_curve

                    plot_loss_curve(metrics_log.path, run_dir / LOSS_PLOT)
            save(state, mid_epoch=False)
    except NonFiniteLossError as e:
        where = f"the last good checkpoint is {ckpt_path}" if ckpt_path.is_file() else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{e}. Training stopped; {where}. Lower the learning rate or lengthen the warm-up "
            "(optim.lr, optim.warmup_epochs), or try precision=fp32, then rerun with --resume."
        ) from None
    finally:
        metrics_log.close()
    dist.barrier()
    return history


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


def _loader_batch_size(loader: Any) -> int | None:
    """Per-rank batch size of a DataLoader (``None`` when the loader does not tell)."""
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(size) if isinstance(size, int) else None


def _steps_per_epoch(loader: Any, grad_accum: int, max_steps: int | None) -> int | None:
    """Optimizer steps of a full epoch, as ``train_one_epoch`` counts them (``None``: unknown)."""
    try:
        steps = math.ceil(len(loader) / grad_accum)
    except TypeError:  # an iterable without len: only the cap is known
        return max_steps
    return min(steps, max_steps) if max_steps is not None else steps


def _check_resume_layout(ckpt: Mapping[str, Any], layout: Mapping[str, Any], path: Path) -> None:
    """Refuse a mid-epoch resume whose batches would not line up with the checkpoint's."""
    saved = ckpt["train_state"]
    known = {k: saved[k] for k in layout if k in saved}
    if not known:  # written before the layout was saved
        log.warning("%s does not record the world size, batch size and grad_accum it was written with: "
                    "resuming mid-epoch assumes they are unchanged", path)
        return
    if any(known[k] != layout[k] for k in known):
        then = ", ".join(f"{k}={v}" for k, v in known.items())
        now = ", ".join(f"{k}={layout[k]}" for k in known)
        raise ValueError(
            f"{path} was written mid-epoch (epoch {ckpt['epoch']}, batch {ckpt['batch_in_epoch']}) with {then}, "
            f"but this run has {now}: the position in the epoch is counted in batches of the saved layout, "
            "so resuming would skip or repeat images. Resume with the saved settings (torchrun "
            "--nproc_per_node, data.batch_size, train.grad_accum); from an epoch-boundary checkpoint they may change."
        )


def _format_record(record: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "kind")


def _state_for_checkpoint(state: TrainState, dist: DistEnv, mid_epoch: bool) -> dict[str, Any]:
    # Metric sums of the epoch so far are summed over ranks, so rank 0's checkpoint holds the global
    # sums (on resume, rank 0 takes them and the other ranks start from zero). All ranks must call
    # this at the same step: it is a collective.
    keys = sorted(state.sums)
    buf = torch.tensor([state.sums[k] for k in keys] + [state.count], dtype=torch.float64, device=dist.device)
    dist.all_reduce_sum(buf)
    out = asdict(state)
    out["sums"] = {k: buf[i].item() for i, k in enumerate(keys)} if mid_epoch else {}
    out["count"] = buf[-1].item() if mid_epoch else 0.0
    return out


def _resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    loader: Any,
    dist: DistEnv,
    layout: Mapping[str, Any],
) -> tuple[TrainState, dict[str, Any] | None, Iterator[Any] | None]:
    """Restore weights, optimizer, schedule and RNG; position the data stream where the run stopped."""
    # On the CPU: the RNG states must stay CPU tensors (torch.set_rng_state takes a CPU ByteTensor);
    # load_state_dict copies weights and optimizer state to their parameters' device.
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt["batch_in_epoch"] > 0:  # checked before anything is restored
        _check_resume_layout(ckpt, layout, path)
    unwrap_model(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt["scheduler"] is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    saved = ckpt["train_state"]
    state = TrainState(epoch=ckpt["epoch"], step=ckpt["step"], batch_in_epoch=ckpt["batch_in_epoch"])
    # The saved sums are global (summed over ranks): rank 0 takes them, the others start from zero
    # with the same keys (reduce_metrics all-reduces one value per key on every rank).
    if dist.is_main:
        state.sums, state.count = dict(saved["sums"]), float(saved["count"])
    else:
        state.sums = dict.fromkeys(saved["sums"], 0.0)
    batches = None
    rng, rng_epoch_start = ckpt["rng"], ckpt["rng_epoch_start"]
    per_rank = ckpt.get("rng_per_rank") or []
    if len(per_rank) == dist.world_size:
        rng, rng_epoch_start = per_rank[dist.rank]["rng"], per_rank[dist.rank]["rng_epoch_start"]
    elif dist.is_distributed:
        log.warning("checkpoint was written by %d rank(s), resuming on %d: every rank restores rank 0's RNG "
                    "states (the run is not bitwise reproducible)", len(per_rank), dist.world_size)
    if state.batch_in_epoch > 0:
        # Replay the epoch's data stream up to the checkpoint: same sampler epoch, global RNGs as at
        # the epoch start (transforms in the main process may draw from them; the DataLoader's own
        # worker seeds come from loader.generator), fetch the batches already trained on.
        restore_rng_state(rng_epoch_start)
        set_loader_epoch(loader, state.epoch)
        batches = iter(loader)
        for _ in range(state.batch_in_epoch):
            next(batches)
    restore_rng_state(rng)
    log.info("resumed from %s: epoch %d, batch %d, step %d", path, state.epoch, state.batch_in_epoch, state.step)
    return state, rng_epoch_start, batches
