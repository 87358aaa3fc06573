"""Balanced sampling frequencies and DDP sharding of the samplers."""

from __future__ import annotations

import numpy as np
import pytest

from openmednet.data.samplers import DistributedShardSampler, DistributedWeightedSampler, balanced_weights

IMBALANCED = np.array([0] * 90 + [1] * 9 + [2] * 1)


def test_balanced_weights_give_each_group_equal_mass():
    w = balanced_weights(IMBALANCED)
    totals = [w[IMBALANCED == g].sum() for g in range(3)]
    np.testing.assert_allclose(totals, [1 / 3] * 3, rtol=1e-12)
    # unlabelled (-1) is one more group, not dropped
    w = balanced_weights(np.array([-1, -1, -1, 4]))
    np.testing.assert_allclose(w, [1 / 6, 1 / 6, 1 / 6, 1 / 2])


def test_class_balanced_sampling_frequencies():
    sampler = DistributedWeightedSampler(balanced_weights(IMBALANCED), num_samples=30_000, seed=3)
    drawn = IMBALANCED[np.fromiter(sampler, dtype=np.int64)]
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    # binomial sd at p=1/3, n=30000 is 0.0027: 0.015 is more than 5 sd
    np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.015)
    # the single image of class 2 is drawn ~10,000 times: sampling is with replacement
    assert np.count_nonzero(drawn == 2) > 9_000


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("pad", [True, False])
def test_shard_slices_partition_the_epoch_permutation(world_size, pad):
    n = 10
    ranks = [DistributedShardSampler(n, world_size=world_size, rank=r, seed=5, pad=pad) for r in range(world_size)]
    for s in ranks:
        s.set_epoch(2)
    order = ranks[0].epoch_order()
    slices = [list(s) for s in ranks]
    # positions rank, rank+W, ...: interleaving the slices rebuilds the shared order exactly
    rebuilt = [slices[p % world_size][p // world_size] for p in range(len(order))]
    assert rebuilt == order.tolist()
    assert sorted(order[:n].tolist()) == list(range(n))  # one permutation of the dataset
    if pad:
        assert {len(s) for s in slices} == {-(-n // world_size)}
        assert len(order) - n < world_size  # at most W - 1 repeats
    else:
        assert sorted(i for s in slices for i in s) == list(range(n))  # every image exactly once
    assert [len(s) for s in slices] == [len(s) for s in ranks]


def test_shard_order_changes_with_epoch_and_is_reproducible():
    a, b = DistributedShardSampler(50, seed=1), DistributedShardSampler(50, seed=1)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    b.set_epoch(1)
    assert first != second
    assert second == list(b)
    assert list(DistributedShardSampler(50, seed=2)) != first
    assert list(DistributedShardSampler(50, shuffle=False)) == list(range(50))


def test_weighted_slices_partition_the_epoch_draws():
    weights = balanced_weights(IMBALANCED)
    ranks = [DistributedWeightedSampler(weights, world_size=3, rank=r, seed=9) for r in range(3)]
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        order = ranks[0].epoch_order()
        slices = [list(s) for s in ranks]
        assert len(order) == 102 and [len(s) for s in slices] == [34, 34, 34]
        assert [slices[p % 3][p // 3] for p in range(len(order))] == order.tolist()
        if epoch == 0:
            first = order
    assert not np.array_equal(first, order)


def test_seeded_samplers_pair_the_same_indices_with_per_position_seeds():
    plain = DistributedShardSampler(10, world_size=2, rank=1, seed=4)
    seeded = [DistributedShardSampler(10, world_size=2, rank=r, seed=4, seeded=True) for r in range(2)]
    pairs = list(seeded[1])
    assert [i for i, _ in pairs] == list(plain)  # seeds never change the order
    assert pairs == list(DistributedShardSampler(10, world_size=2, rank=1, seed=4, seeded=True))
    all_seeds = [s for r in seeded for _, s in r]
    assert len(set(all_seeds)) == 10  # one seed per position, across ranks
    seeded[1].set_epoch(1)
    assert {s for _, s in seeded[1]}.isdisjoint({s for _, s in pairs})
    weighted = DistributedWeightedSampler(balanced_weights(IMBALANCED), seed=2, seeded=True)
    assert [i for i, _ in weighted] == list(DistributedWeightedSampler(balanced_weights(IMBALANCED), seed=2))


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="rank must be in"):
        DistributedShardSampler(10, world_size=2, rank=2)
    with pytest.raises(ValueError, match="empty dataset"):
        DistributedShardSampler(0)
    with pytest.raises(ValueError, match="non-negative"):
        DistributedWeightedSampler([1.0, -1.0])
