"""``build_loader``: a DataLoader with the right sampler for one process or one DDP rank.

Seeding: the sampler order depends only on ``(seed, epoch)`` (see ``samplers``). For datasets
that accept ``(index, seed)`` keys (``supports_seeded_keys``: ``CorpusDataset``,
``LabelledDataset``) the sampler also hands every position of the epoch a seed for its
augmentation, so the batches are a pure function of ``(seed, epoch)``: the same with 0, 1 or 8
workers, with persistent workers (which torch seeds only once, at their start), on every resume,
and different across ranks (they hold different positions). For other datasets, torch seeds each
worker's ``torch``, ``random`` and ``numpy`` generators from the loader's ``generator``, seeded
from ``(seed, rank)``; with ``num_workers=0`` their transforms draw from the global torch
generator. Workers run with one intra-op thread each (torch sets it), so ``num_workers`` is the
number of cores the loader uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from openmednet._errors import look_up_option
from openmednet.data.samplers import (
    BALANCE_MODES,
    DistributedShardSampler,
    DistributedWeightedSampler,
    balanced_weights,
)

__all__ = ["build_loader", "build_sampler"]

# dataset attribute holding the per-sample groups of each balance mode
_BALANCE_ATTRS = {"class": "labels", "source": "sources"}


def build_sampler(
    dataset: Dataset,
    *,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    balance: str | None = None,
    shuffle: bool = True,
    pad: bool | None = None,
) -> Sampler[int]:
    """The sampler ``build_loader`` uses (exposed for custom loaders).

    Args:
        dataset: a sized dataset; for ``balance`` it must expose ``.labels`` (``"class"``) or
            ``.sources`` (``"source"``) as ``(N,)`` integer arrays, as ``CorpusDataset`` does.
        world_size, rank: DDP layout (1, 0 for one process).
        seed: base seed of the epoch orders.
        balance: ``None`` (uniform permutation), ``"class"`` or ``"source"`` (weighted draws with
            replacement, each group equally likely).
        shuffle: ``False`` keeps dataset order (evaluation); not allowed with ``balance``.
        pad: pad epochs to equal rank lengths; default ``shuffle`` (pad training, never
            evaluation, so gathered metrics count every image once).

    The sampler yields ``(index, seed)`` pairs when the dataset has ``supports_seeded_keys``.

    Raises:
        KeyError: unknown ``balance``.
        ValueError: ``balance`` without ``shuffle``, or a dataset without the needed attribute.
    """
    n = len(dataset)  # type: ignore[arg-type]
    seeded = bool(getattr(dataset, "supports_seeded_keys", False))
    if balance is None:
        pad = shuffle if pad is None else pad
        return DistributedShardSampler(
            n, world_size=world_size, rank=rank, shuffle=shuffle, seed=seed, pad=pad, seeded=seeded
        )
    look_up_option(balance, BALANCE_MODES, "balance mode")
    if not shuffle:
        raise ValueError("balance needs random sampling: use shuffle=True (or balance=None for evaluation)")
    attr = _BALANCE_ATTRS[balance]
    groups = getattr(dataset, attr, None)
    if groups is None or len(groups) != n:
        raise ValueError(
            f"balance='{balance}' needs dataset.{attr}, an array of {n} integers "
            f"({type(dataset).__name__} has {'none' if groups is None else len(groups)})"
        )
    weights = balanced_weights(np.asarray(groups))
    return DistributedWeightedSampler(weights, world_size=world_size, rank=rank, seed=seed, seeded=seeded)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    balance: str | None = None,
    num_workers: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    pad: bool | None = None,
    **loader_kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` over this rank's share of ``dataset``.

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch (``engine.trainer`` does): the epoch
    order is drawn from ``(seed, epoch)``.

    Args:
        dataset: e.g. ``CorpusDataset`` or ``LabelledDataset``.
        batch_size: images per batch on this rank.
        world_size, rank: DDP layout; each rank gets a disjoint slice of the epoch order.
        seed: the same on every rank.
        balance: ``None``, ``"class"`` or ``"source"`` (see :func:`build_sampler`).
        num_workers: worker processes (0 = load in the main process). Workers are persistent, so
            they start once, not every epoch.
        shuffle: random order (training) or dataset order (evaluation).
        drop_last: drop the last incomplete batch (keeps batch norm statistics from a tiny batch).
        pad: see :func:`build_sampler`.
        **loader_kwargs: passed to ``DataLoader`` (``collate_fn``, ``prefetch_factor``...).

    Returns:
        The DataLoader; ``pin_memory`` is on only when CUDA is available.

    Raises:
        ValueError: bad ``batch_size``/``num_workers``/rank, or see :func:`build_sampler`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = build_sampler(
        dataset, world_size=world_size, rank=rank, seed=seed, balance=balance, shuffle=shuffle, pad=pad
    )
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        **loader_kwargs,
    )
