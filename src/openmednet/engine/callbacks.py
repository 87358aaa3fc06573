"""Callbacks of the training loop (``openmednet.engine.loop.fit``): all a run does besides its steps.

The loop knows no task: pre-training adds ``MetricsLogger``, ``Checkpointing`` and ``Monitor``
(the k-NN transfer monitor); fine-tuning adds ``EarlyStopping`` on its validation score. Hooks,
called for every callback in list order (the base class's are no-ops):

=============================== ===================================================================
``restore(loop)``               before training: resume (may set ``loop.state``, ``loop.batches``)
``on_fit_start(loop)``          before the first epoch, after every ``restore``
``on_epoch_start(loop, resumed)`` an epoch begins (``resumed``: mid-epoch, from a checkpoint)
``on_step(loop)``               after every optimizer step (``loop.state`` counts it)
``on_epoch_end(loop, record)``  measure: add entries to the epoch ``record``; may set ``loop.stop``
``on_record(loop, record)``     the record is final (``time_s`` included): log, write, checkpoint
``on_fit_end(loop)``            after the last epoch (also after an early stop; not after an error)
``on_nonfinite(loop)``          the loss went NaN/inf: a note for the error message, or ``None``
``teardown(loop)``              always, last: release files
=============================== ===================================================================

Non-finite losses are detected inside the step (``train_one_epoch``), before the optimizer step and
agreed by all ranks, which a callback after the step could not do; callbacks only explain them
(``on_nonfinite``). The learning-rate schedule is stepped there too, once per optimizer step: it is
saved with the optimizer in every checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openmednet.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from openmednet.engine.distributed import DistEnv, unwrap_model
from openmednet.engine.trainer import TrainState, current_lr, set_loader_epoch
from openmednet.utils import atomic_write_text

__all__ = [
    "CHECKPOINT_LAST",
    "LOSS_PLOT",
    "METRICS_FILE",
    "Callback",
    "Checkpointing",
    "EarlyStopping",
    "LogEpochs",
    "Loop",
    "MetricsLog",
    "MetricsLogger",
    "Monitor",
    "StepHook",
    "better_score",
]

log = logging.getLogger(__name__)

CHECKPOINT_LAST = "checkpoint-last.pt"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


@dataclass
class Loop:
    """What callbacks see of a run in progress (``fit`` builds it).

    Attributes:
        model: the trained module (DDP-wrapped when distributed).
        loader, optimizer, scheduler, scaler, dist, grad_accum, max_steps_per_epoch: as given to ``fit``.
        end_epoch: the run stops before this epoch number.
        state: step counters and metric sums (``TrainState``).
        batches: an iterator positioned mid-epoch by a resume, consumed by the next epoch.
        resumed: a checkpoint was restored.
        stop: set by a callback to end the run after the current epoch.
        history: the epoch records of this call.
    """

    model: nn.Module
    loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    dist: DistEnv
    grad_accum: int
    max_steps_per_epoch: int | None
    end_epoch: int
    state: TrainState
    batches: Iterator[Any] | None = None
    resumed: bool = False
    stop: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class Callback:
    """Base class: every hook is a no-op (see the module docstring for when each runs)."""

    def restore(self, loop: Loop) -> None: ...
    def on_fit_start(self, loop: Loop) -> None: ...
    def on_epoch_start(self, loop: Loop, resumed: bool) -> None: ...
    def on_step(self, loop: Loop) -> None: ...
    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None: ...
    def on_record(self, loop: Loop, record: dict[str, Any]) -> None: ...
    def on_fit_end(self, loop: Loop) -> None: ...
    def on_nonfinite(self, loop: Loop) -> str | None: ...
    def teardown(self, loop: Loop) -> None: ...


class StepHook(Callback):
    """A plain ``fn(state, model)`` called after every optimizer step (custom monitoring, tests)."""

    def __init__(self, fn: Callable[[TrainState, nn.Module], None]):
        self.fn = fn

    def on_step(self, loop: Loop) -> None:
        self.fn(loop.state, loop.model)


class LogEpochs(Callback):
    """One ``logging`` line per epoch record, on rank 0."""

    def on_record(self, loop: Loop, record: dict[str, Any]) -> None:
        if loop.dist.is_main:
            log.info("epoch %d: %s", record["epoch"], _format_record(record))


def _format_record(record: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "kind")


# ------------------------------------------------------------------------------ model choice
def better_score(score: tuple[float, float], best: tuple[float, float] | None) -> bool:
    """Whether ``score = (metric, loss)`` beats ``best``: a higher metric wins (NaN counts as the
    lowest), ties go to the lower loss (tiny validation sets often reach AUROC 1.0)."""
    if best is None:
        return True
    auc, loss = (-math.inf if math.isnan(score[0]) else score[0]), score[1]
    best_auc, best_loss = (-math.inf if math.isnan(best[0]) else best[0]), best[1]
    return auc > best_auc or (auc == best_auc and loss < best_loss)


class EarlyStopping(Callback):
    """Model choice on a validation score with patience; the best epoch's weights are restored at the end.

    Args:
        measure: ``model -> {name: value}`` after every epoch, added to the epoch record; its
            entries are the metric to maximise and ``tie_break`` (lower wins on equal metrics).
        patience: stop after this many epochs without a better score.
        metric: the entry to maximise; ``None``: the first entry other than ``tie_break``.
        tie_break: the entry that decides ties.
        min_epochs: a warm-up of this many epochs that are measured (their scores stay in the
            record) but neither chosen nor counted towards ``patience``: Keras' ``EarlyStopping
            (start_from_epoch=...)``. Why: a segmentation model that still predicts almost no
            foreground can score a noisy early Dice peak that a learning model needs many epochs
            to pass; counted from epoch 1, patience then stops it before it learns (an ImageNet
            encoder on lgg_flair at 10% labels was stopped at epoch 10 by a Dice of 0.09 at epoch 2).

    Attributes:
        best_epoch: number of the chosen epoch (``record["epoch"]``), ``None`` before the first.
    """

    def __init__(self, measure: Callable[[nn.Module], Mapping[str, float]], patience: int,
                 metric: str | None = None, tie_break: str = "val_loss", min_epochs: int = 0):
        if patience < 1 or min_epochs < 0:
            raise ValueError(f"patience must be >= 1 and min_epochs >= 0, got {patience} and {min_epochs}")
        self.measure, self.patience, self.metric, self.tie_break = measure, patience, metric, tie_break
        self.min_epochs, self.epochs_seen = min_epochs, 0
        self.best: tuple[float, float] | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, Any] | None = None
        self.stale = 0

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        model = unwrap_model(loop.model)
        scores = dict(self.measure(model))
        record.update(scores)
        metric = self.metric or next(name for name in scores if name != self.tie_break)
        score = (scores[metric], scores[self.tie_break])
        self.epochs_seen += 1
        if self.epochs_seen <= self.min_epochs:
            return
        if better_score(score, self.best):
            self.best, self.best_epoch, self.stale = score, record["epoch"], 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.stale += 1
            if self.stale >= self.patience:
                log.info("early stop: no better validation score for %d epochs", self.stale)
                loop.stop = True

    def on_fit_end(self, loop: Loop) -> None:
        if self.best_state is not None:
            unwrap_model(loop.model).load_state_dict(self.best_state)
        elif self.epochs_seen:
            warnings.warn(f"no epoch was chosen: the run ended within the {self.min_epochs}-epoch warm-up "
                          f"(min_epochs); the last epoch's weights are kept", stacklevel=2)


# ------------------------------------------------------------------------------ monitor
class Monitor(Callback):
    """``monitor(model) -> metrics`` on rank 0 every ``every_epochs`` epochs and after the last
    (e.g. ``KnnMonitor``); other ranks pass ``None`` and wait for it in the next collective."""

    def __init__(self, monitor: Callable[[nn.Module], dict[str, float]] | None, every_epochs: int = 1):
        self.monitor, self.every_epochs = monitor, every_epochs

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        epoch = record["epoch"]
        last = epoch == loop.end_epoch - 1
        if loop.dist.is_main and self.monitor is not None and ((epoch + 1) % self.every_epochs == 0 or last):
            record.update(self.monitor(unwrap_model(loop.model)))


# ------------------------------------------------------------------------------ metrics log
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


class MetricsLogger(Callback):
    """``run_dir/metrics.jsonl``: every epoch record, a ``kind: "step"`` record every ``every_steps``
    optimizer steps (the loss averaged over all ranks since the previous one), and the loss plot.

    A fresh run starts a fresh log; a resumed one drops the records after its checkpoint (they are
    replayed): ``on_fit_start`` reads ``loop.resumed``, set by ``Checkpointing.restore``. List it
    before ``Checkpointing``, so a record is on disk before the checkpoint that follows it.
    """

    def __init__(self, run_dir: str | Path, every_steps: int = 10, tensorboard: bool = False, plot: bool = True):
        self.run_dir, self.every_steps, self.tensorboard, self.plot = Path(run_dir), every_steps, tensorboard, plot
        self.log: MetricsLog | None = None
        self.sum = torch.zeros(2, dtype=torch.float64)  # loss * n, n since the last step record

    def on_fit_start(self, loop: Loop) -> None:
        self.log = MetricsLog(self.run_dir, enabled=loop.dist.is_main, tensorboard=self.tensorboard)
        if loop.resumed:
            self.log.truncate(before_step=loop.state.step + 1)
        elif loop.dist.is_main:
            self.log.truncate(before_step=0)

    def on_epoch_start(self, loop: Loop, resumed: bool) -> None:
        st = loop.state
        if resumed:
            self.sum.copy_(torch.tensor([st.sums.get("loss", 0.0), st.count], dtype=torch.float64))
        else:
            self.sum.zero_()

    def on_step(self, loop: Loop) -> None:
        st = loop.state
        if self.every_steps and st.step % self.every_steps == 0:
            loss_n = torch.tensor([st.sums.get("loss", 0.0), st.count], dtype=torch.float64)
            delta = loop.dist.reduce_metrics({"loss": (loss_n - self.sum)[0].item()}, (loss_n - self.sum)[1].item())
            self.log.write({"kind": "step", "epoch": st.epoch, "step": st.step, "train/loss": delta["loss"],
                            "lr": current_lr(loop.optimizer)})
            self.sum.copy_(loss_n)

    def on_record(self, loop: Loop, record: dict[str, Any]) -> None:
        self.log.write(record)
        if loop.dist.is_main and self.plot:
            from openmednet.engine.plots import plot_loss_curve

            plot_loss_curve(self.log.path, self.run_dir / LOSS_PLOT)

    def teardown(self, loop: Loop) -> None:
        if self.log is not None:
            self.log.close()


# ------------------------------------------------------------------------------ checkpoints
class Checkpointing(Callback):
    """Atomic ``run_dir/checkpoint-last.pt`` after every epoch (and every ``every_steps`` optimizer
    steps), and exact resume from it (``resume=True``): see ``openmednet.engine.trainer``.

    Args:
        run_dir: where the checkpoint lives.
        resume: continue from the checkpoint when it exists.
        every_steps: also checkpoint every N optimizer steps (mid-epoch resume); 0 = epoch ends only.
            The epoch's last step is skipped: the epoch-end checkpoint follows it.
        meta: plain-typed entries stored in every checkpoint (``model_name``, ``model_args``,
            ``config``, ``extra``).
    """

    def __init__(self, run_dir: str | Path, resume: bool = False, every_steps: int = 0,
                 meta: Mapping[str, Any] | None = None):
        self.path = Path(run_dir) / CHECKPOINT_LAST
        self.resume, self.every_steps, self.meta = resume, every_steps, dict(meta or {})
        self.rng_epoch_start: dict[str, Any] | None = None

    def _layout(self, loop: Loop) -> dict[str, Any]:
        return {"world_size": loop.dist.world_size, "batch_size": _loader_batch_size(loop.loader),
                "grad_accum": loop.grad_accum}

    def restore(self, loop: Loop) -> None:
        self.layout = self._layout(loop)
        self.steps_per_epoch = _steps_per_epoch(loop.loader, loop.grad_accum, loop.max_steps_per_epoch)
        if self.resume and self.path.is_file():
            loop.state, self.rng_epoch_start, loop.batches = _resume(
                self.path, loop.model, loop.optimizer, loop.scheduler, loop.scaler, loop.loader, loop.dist, self.layout)
            loop.resumed = True

    def on_epoch_start(self, loop: Loop, resumed: bool) -> None:
        if not resumed:  # a mid-epoch resume keeps the epoch start's states from its checkpoint
            self.rng_epoch_start = capture_rng_state()

    def on_step(self, loop: Loop) -> None:
        st = loop.state
        # Not on the epoch's last step: the epoch-end checkpoint follows (after the monitor), and a
        # "mid-epoch" one there would resume into an exhausted epoch.
        last_of_epoch = self.steps_per_epoch is not None and math.ceil(st.batch_in_epoch / loop.grad_accum) >= self.steps_per_epoch
        if self.every_steps and st.step % self.every_steps == 0 and not last_of_epoch:
            self.save(loop, mid_epoch=True)

    def on_record(self, loop: Loop, record: dict[str, Any]) -> None:
        self.save(loop, mid_epoch=False)

    def on_nonfinite(self, loop: Loop) -> str | None:
        where = f"the last good checkpoint is {self.path}" if self.path.is_file() else "no checkpoint was written yet"
        return (f"Training stopped; {where}. Lower the learning rate or lengthen the warm-up "
                "(optim.lr, optim.warmup_epochs), or try precision=fp32, then rerun with --resume.")

    def save(self, loop: Loop, mid_epoch: bool) -> None:
        """Write the checkpoint (a collective: every rank calls it at the same step, rank 0 writes)."""
        st, dist = loop.state, loop.dist
        # Collectives first (every rank takes part), then rank 0 writes. Each rank's RNG streams are
        # kept, so a resumed DDP run gives each rank its own augmentation stream back.
        rng_per_rank = dist.all_gather_object(
            {"rng": capture_rng_state(), "rng_epoch_start": self.rng_epoch_start if mid_epoch else None}
        )
        extra = {
            **self.meta.get("extra", {}),
            "train_state": {**_state_for_checkpoint(st, dist, mid_epoch), **self.layout},
            "rng_per_rank": rng_per_rank,
        }
        save_checkpoint(
            self.path, model=loop.model, optimizer=loop.optimizer, scheduler=loop.scheduler, scaler=loop.scaler,
            epoch=st.epoch if mid_epoch else st.epoch + 1, step=st.step,
            batch_in_epoch=st.batch_in_epoch if mid_epoch else 0,
            rng_epoch_start=self.rng_epoch_start if mid_epoch else None, dist=dist,
            model_name=self.meta.get("model_name"), model_args=self.meta.get("model_args"),
            config=self.meta.get("config"), extra=extra,
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
