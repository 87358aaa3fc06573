"""Training checkpoints: written atomically by rank 0, read back with ``torch.load(weights_only=True)``.

A checkpoint is a dict of plain types and tensors only (no pickled objects, so loading one cannot
run code), holding everything needed to continue a run bit for bit:

=================  =========================================================================
``format``         ``CHECKPOINT_FORMAT`` (bumped when the layout changes)
``model_name``     registry name of the backbone (``"mednet_gray"``), plus ``model_args``
``model``          ``state_dict`` of the trained module (backbone + objective heads)
``optimizer``      optimizer ``state_dict``; ``scheduler`` and ``scaler`` likewise (or ``None``)
``epoch``          epoch in progress (or the next one when ``epoch_done`` is true)
``step``           optimizer steps done since the start of the run (global step)
``batch_in_epoch`` batches of ``epoch`` already consumed (0 at an epoch boundary)
``rng``            Python / NumPy / torch (CPU and CUDA) RNG states, as lists and tensors
``rng_epoch_start`` the same states as they were when ``epoch`` started (to replay its data order)
``config``         the resolved run config as a plain dict
``versions``       openmednet, torch, numpy, Python versions (for provenance)
=================  =========================================================================

Files are written through ``openmednet.utils.atomic_write``: a killed run leaves the previous
checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import logging
import pickle
import platform
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from openmednet.engine.distributed import DistEnv, unwrap_model
from openmednet.utils import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as lists and tensors (loadable with ``weights_only``)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``.

    The tensors may live on any device (a checkpoint loaded with ``map_location="cuda"``): they are
    copied to the CPU first, as ``torch.set_rng_state`` and ``torch.cuda.set_rng_state_all`` take CPU
    ``ByteTensor``s.
    """
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.cpu().numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _versions() -> dict[str, str]:
    import openmednet

    return {
        "openmednet": openmednet.__version__,
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
    }


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    epoch: int,
    step: int,
    dist: DistEnv | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    model_name: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    batch_in_epoch: int = 0,
    rng_epoch_start: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path | None:
    """Write a checkpoint atomically; only rank 0 writes (other ranks return ``None`` at once).

    Args:
        path: target file, typically ``run_dir / "checkpoint-last.pt"``.
        model: trained module (a DDP wrapper is unwrapped, so keys have no ``module.`` prefix).
        optimizer: its state is saved when given.
        epoch: epoch in progress (``batch_in_epoch > 0``) or the next epoch to run.
        step: global optimizer step count.
        dist: distributed environment; ``None`` means single process.
        scheduler: LR scheduler (anything with ``state_dict``).
        scaler: ``torch.amp.GradScaler`` for fp16.
        model_name: registry name of the backbone, to rebuild it with ``create_model``.
        model_args: constructor arguments of the backbone (``MedNet.model_args()``).
        config: resolved run config as plain types.
        batch_in_epoch: batches of ``epoch`` already trained on (mid-epoch checkpoint).
        rng_epoch_start: RNG states captured at the start of ``epoch`` (needed mid-epoch).
        extra: more plain-typed entries (e.g. label space of the supervised head).

    Returns:
        The path written, or ``None`` on ranks other than 0.
    """
    if dist is not None and not dist.is_main:
        return None
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model_name": model_name,
        "model_args": dict(model_args or {}),
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "batch_in_epoch": int(batch_in_epoch),
        "rng": capture_rng_state(),
        "rng_epoch_start": dict(rng_epoch_start) if rng_epoch_start is not None else None,
        "config": dict(config or {}),
        "versions": _versions(),
        **dict(extra or {}),
    }
    path = Path(path)
    atomic_write(path, lambda f: torch.save(ckpt, f))
    log.debug("checkpoint written: %s (epoch %d, step %d)", path, epoch, step)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (``weights_only=True``: no code runs).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is unreadable (truncated, empty, corrupt) or not a checkpoint of a
            format this version reads.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: start without --resume, or point to the run directory")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        # A truncated, empty or foreign file (a copy cut short, a full disk before atomic writes):
        # torch's own messages were tracebacks, and an empty file's EOFError reached the command
        # line as a bare "Aborted." (click reads EOFError as a user abort).
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is unreadable, truncated or corrupt ({first}): delete it to start the run again, "
                         f"or restore a good copy") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path} is not an OpenMedNet checkpoint of format {CHECKPOINT_FORMAT} (got {got}); "
            "was it written by another tool or version?"
        )
    return ckpt
