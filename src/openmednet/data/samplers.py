"""Samplers: class- or source-balanced sampling and correct sharding across DDP ranks.

Imbalance: the MedNet paper answers class imbalance with augmentation; sampling the rare classes
(or the small sources of a multi-source corpus) more often is the simplest form of that answer:
every image is drawn with probability proportional to ``1 / count(its group)``, so each group
(class or source) contributes the same expected number of images per epoch, each seen under a
fresh random augmentation.

Distributed sharding (both samplers): every rank builds the *same* epoch order from
``(seed, epoch)`` and takes the positions ``rank, rank + W, rank + 2W, ...`` of it (``W`` = world
size). The ranks' slices are disjoint and their union is the whole epoch order. ``set_epoch``
must be called at the start of every epoch (the trainer does), or every epoch repeats the first
one's order, as with ``torch.utils.data.DistributedSampler``.

Augmentation seeds (``seeded=True``, what ``build_loader`` uses for this package's datasets): the
samplers then yield ``(index, sample_seed)`` pairs, with one seed per position of the epoch order
drawn from its own ``(seed, epoch)`` stream. The datasets seed the transform's random draws with
it, so an image's augmentation is a pure function of ``(seed, epoch, position)``: identical for
any number of loader workers, across persistent workers, and after a resume in another process.

Padding: DDP needs the same number of batches on every rank (otherwise a collective waits
forever), so training epochs are padded to a multiple of ``W``:

- :class:`DistributedShardSampler` with ``pad=True`` repeats the first ``ceil(N / W) * W - N``
  entries of the epoch order (at most ``W - 1`` images seen twice per epoch), like torch's
  ``DistributedSampler``. With ``pad=False`` (evaluation) nothing is repeated: ranks differ by at
  most one image, and metrics gathered over ranks are exact. Ranks may then run different numbers
  of batches, so gather predictions once after the loop, never with a collective per batch.
- :class:`DistributedWeightedSampler` draws with replacement, so "padding" is just drawing
  ``ceil(N / W) * W`` instead of ``N`` indices: no bias beyond that of sampling itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["DistributedShardSampler", "DistributedWeightedSampler", "BALANCE_MODES", "balanced_weights"]

BALANCE_MODES = ("class", "source")


def balanced_weights(groups: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-sample weights ``1 / count(group)`` (normalised to sum to 1).

    Every distinct value of ``groups`` (a class, a source; ``-1`` "unlabelled" counts as one more
    group) then gets the same total probability.

    Args:
        groups: ``(N,)`` integer group of each sample.

    Returns:
        ``(N,)`` float64 probabilities.

    Raises:
        ValueError: ``groups`` is empty or not one-dimensional.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.size == 0:
        raise ValueError(f"groups must be a non-empty 1-D array, got shape {groups.shape}")
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return weights / weights.sum()


def _check_rank(world_size: int, rank: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def _epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    # One stream per (seed, epoch), identical on every rank; SeedSequence keeps nearby seeds apart.
    # Stream 1 holds the augmentation seeds, so turning them on never changes the sample order.
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, stream]))


def _rank_items(order: np.ndarray, sampler: DistributedShardSampler | DistributedWeightedSampler) -> Iterator:
    """This rank's slice of ``order``, paired with per-position augmentation seeds when seeded."""
    mine = order[sampler.rank :: sampler.world_size].tolist()
    if not sampler.seeded:
        return iter(mine)
    seeds = _epoch_rng(sampler.seed, sampler.epoch, 1).integers(0, 2**62, size=len(order), dtype=np.int64)
    return zip(mine, seeds[sampler.rank :: sampler.world_size].tolist())


class DistributedShardSampler(Sampler[int]):
    """Each rank's disjoint slice of one ``(seed, epoch)``-seeded permutation (or of ``0..N-1``).

    Works for a single process too (``world_size=1``), so training code has one path.

    Args:
        num_samples: dataset length ``N``.
        world_size: number of ranks ``W``.
        rank: this process's rank.
        shuffle: permute each epoch; ``False`` keeps dataset order (evaluation).
        seed: base seed, the same on every rank.
        pad: repeat the start of the order so every rank gets ``ceil(N / W)`` indices (training);
            ``False`` gives ranks ``floor`` or ``ceil`` of ``N / W`` with no repeats (evaluation).
        seeded: yield ``(index, augmentation seed)`` pairs instead of indices (module docstring).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        pad: bool = True,
        seeded: bool = False,
    ):
        _check_rank(world_size, rank)
        if num_samples < 1:
            raise ValueError(f"cannot sample from an empty dataset (num_samples={num_samples})")
        self.num_samples, self.world_size, self.rank = num_samples, world_size, rank
        self.shuffle, self.seed, self.pad, self.seeded = shuffle, seed, pad, seeded
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def epoch_order(self) -> np.ndarray:
        """The full epoch order shared by all ranks, padded when ``pad`` (``(total,)`` int64)."""
        n = self.num_samples
        order = _epoch_rng(self.seed, self.epoch).permutation(n) if self.shuffle else np.arange(n)
        if self.pad:
            total = math.ceil(n / self.world_size) * self.world_size
            order = np.resize(order, total)  # np.resize repeats from the start: the padding
        return order.astype(np.int64)

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        return _rank_items(self.epoch_order(), self)

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.num_samples / self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement, sharded across ranks.

    Each epoch draws ``ceil(num_samples / W) * W`` indices with probabilities ``weights`` from a
    ``(seed, epoch)`` stream shared by all ranks; rank ``r`` yields draws ``r, r + W, ...``. Use
    :func:`balanced_weights` for class- or source-balanced epochs.

    Args:
        weights: ``(N,)`` non-negative sample weights (need not sum to 1).
        num_samples: draws per epoch over all ranks; default ``N`` (an epoch "as long as" the data).
        world_size: number of ranks.
        rank: this process's rank.
        seed: base seed, the same on every rank.
        seeded: yield ``(index, augmentation seed)`` pairs instead of indices (module docstring).
    """

    def __init__(
        self,
        weights: Sequence[float] | np.ndarray,
        *,
        num_samples: int | None = None,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        seeded: bool = False,
    ):
        _check_rank(world_size, rank)
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("weights must be a non-empty 1-D array of finite non-negative values with a positive sum")
        self.probabilities = w / w.sum()
        self.num_samples = len(w) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        self.world_size, self.rank, self.seed, self.seeded = world_size, rank, seed, seeded
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws the next iteration yields."""
        self.epoch = epoch

    def epoch_order(self) -> np.ndarray:
        """All ranks' draws of the current epoch, ``(ceil(num_samples / W) * W,)`` int64."""
        total = len(self) * self.world_size
        rng = _epoch_rng(self.seed, self.epoch)
        return rng.choice(len(self.probabilities), size=total, replace=True, p=self.probabilities).astype(np.int64)

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        return _rank_items(self.epoch_order(), self)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)
