"""One process or many: the distributed environment of a training run.

The same training loop runs as a plain ``python`` process and, unchanged, under ``torchrun``
(``DistributedDataParallel``): ``DistEnv.from_env()`` reads the variables torchrun sets
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) and returns a
single-process environment when they are absent. Nothing here is global state beyond what
``torch.distributed`` itself keeps; the environment object is passed explicitly.

Backends: ``nccl`` on CUDA, ``gloo`` on CPU (the only one that runs on our 2-core CI machines).
"""

from __future__ import annotations

import datetime
import logging
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch import nn

__all__ = ["DistEnv", "unwrap_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Rank, world size and device of this process.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes (1 without torchrun).
        local_rank: rank on this node; selects the CUDA device.
        device: the device this process computes on.
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (single process, no process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @classmethod
    def from_env(cls, device: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
        """Build the environment from torchrun's variables, initialising the process group once.

        Args:
            device: ``"cpu"``, ``"cuda"`` (``cuda:LOCAL_RANK``), ``"cuda:N"`` (one process, or N equal
                to the rank's ``LOCAL_RANK``) or ``None`` (CUDA when available, else CPU).
            timeout_s: collective timeout; a rank that dies makes the others fail after this long
                instead of hanging forever.

        Returns:
            A single-process ``DistEnv`` when ``WORLD_SIZE`` is unset or 1.

        Raises:
            ValueError: an unknown or unsupported device (``"gpu"``, ``"mps"``), CUDA requested
                without a CUDA device, ``cuda:N`` that does not exist or conflicts with
                ``LOCAL_RANK`` under torchrun, or inconsistent torchrun variables.
        """
        dev = _parse_device(device)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size}); launch with torchrun")
        want_cuda = dev.type == "cuda"
        if want_cuda:
            dev = _cuda_device(dev, device, local_rank, world_size)
            torch.cuda.set_device(dev)
        else:
            dev = torch.device("cpu")
        if world_size == 1:
            return cls(device=dev)
        backend = "nccl" if want_cuda else "gloo"
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=dev if want_cuda else None,
            )
        log.debug("rank %d/%d on %s (%s)", rank, world_size, dev, backend)
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)

    @property
    def is_distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and logs progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.is_distributed:
            torch_dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place, and return it (identity in a single process)."""
        if self.is_distributed:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
        if not self.is_distributed:
            return [obj]
        out: list[object] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def reduce_metrics(self, sums: Mapping[str, float], count: float) -> dict[str, float]:
        """Average per-sample metric sums over all ranks.

        Each rank passes the *sum* of each metric over the samples it saw and how many samples that
        was; the result is ``sum over ranks / count over ranks``, so it equals the single-process
        mean over the same samples whatever the split between ranks.

        Args:
            sums: metric name -> sum over this rank's samples. Every rank must pass the same keys.
            count: number of samples (or weight) behind ``sums`` on this rank.

        Returns:
            Metric name -> mean over all ranks' samples (``nan`` if no rank saw a sample).

        Raises:
            ValueError: on every rank at once, when the ranks passed different keys (all-reducing
                buffers of different lengths would fail with gloo and hang with NCCL).
        """
        keys = sorted(sums)
        if self.is_distributed:
            self._check_same_keys(keys)
        # float64: sums of losses over millions of samples lose digits in float32.
        buf = torch.tensor([float(sums[k]) for k in keys] + [float(count)], dtype=torch.float64, device=self.device)
        self.all_reduce_sum(buf)
        total = buf[-1].item()
        return {k: (buf[i].item() / total if total > 0 else float("nan")) for i, k in enumerate(keys)}

    def _check_same_keys(self, keys: list[str]) -> None:
        # One fixed-size collective: max over ranks of (n, crc, -n, -crc) gives both max and min of
        # the key count and of a checksum of the names; every rank sees the same result.
        sig = [float(len(keys)), float(zlib.crc32("\n".join(keys).encode()))]
        buf = torch.tensor(sig + [-v for v in sig], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(buf, op=torch_dist.ReduceOp.MAX)
        if not torch.equal(buf[:2], -buf[2:]):
            raise ValueError(
                f"ranks passed different metric names to reduce_metrics (rank {self.rank}: {keys}): every "
                "rank must report the same metrics, including a rank that saw no sample (its sums are 0.0)"
            )

    def wrap_model(self, model: nn.Module, sync_batchnorm: bool = True) -> nn.Module:
        """Move ``model`` to the device and wrap it in ``DistributedDataParallel`` when distributed.

        ``SyncBatchNorm`` is used on CUDA when ``sync_batchnorm`` is true (PyTorch implements it for
        GPUs only). On CPU every rank normalises with its own batch statistics, and DDP broadcasts
        rank 0's running statistics at each forward so evaluation sees one set of buffers.

        Returns:
            The model itself in a single process; a ``DistributedDataParallel`` wrapper otherwise.
        """
        model = model.to(self.device)
        if not self.is_distributed:
            return model
        if sync_batchnorm and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def destroy(self) -> None:
        """Tear down the process group (call once at the end of a distributed run)."""
        if self.is_distributed and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _parse_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` of type cpu or cuda (CUDA when available for ``None``)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device '{device}': use 'cpu', 'cuda' or 'cuda:N' (or leave it unset: "
                         "CUDA when available, else CPU)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device '{device}' is not supported for training here: use 'cpu', 'cuda' or 'cuda:N'")
    return dev


def _cuda_device(dev: torch.device, asked: object, local_rank: int, world_size: int) -> torch.device:
    """The CUDA device of this process: ``cuda:LOCAL_RANK`` unless one process names its own."""
    if not torch.cuda.is_available():
        raise ValueError(f"device '{asked}' requested but torch.cuda.is_available() is False: use device=cpu")
    if dev.index is None:
        dev = torch.device("cuda", local_rank)
    elif world_size > 1 and dev.index != local_rank:
        raise ValueError(
            f"device '{asked}' names one GPU, but under torchrun each rank uses cuda:LOCAL_RANK (this rank: "
            f"cuda:{local_rank}): pass device=cuda and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    count = torch.cuda.device_count()
    if dev.index >= count:
        raise ValueError(f"device '{dev}' does not exist: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return dev


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
