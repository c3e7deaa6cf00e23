"""Partitioning: IID (unchanged), Dirichlet label skew, by label, validation hold-out; all deterministic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedq.errors import DataError
from fedq.learning.data import load_dataset, shard_indices, split_indices
from fedq.learning.dataspec import DataSpec
from fedq.learning.partition import (
    dirichlet_partition,
    label_partition,
    load_client_data,
    load_shard,
    partition_indices,
    validation_split,
)


def _labels(n: int = 600, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    y = np.random.default_rng(seed).integers(0, classes, n)
    train = np.sort(np.random.default_rng(seed + 1).choice(n, int(n * 0.8), replace=False))
    return y, train


def _check_cover(shards: list[np.ndarray], train: np.ndarray) -> None:
    joined = np.concatenate(shards)
    assert len(joined) == len(np.unique(joined)) == len(train), "shards must be disjoint and cover the training rows"
    assert np.array_equal(np.sort(joined), np.sort(train))
    assert all(np.array_equal(s, np.sort(s)) for s in shards)


def test_dirichlet_is_deterministic_disjoint_and_covering() -> None:
    y, train = _labels()
    a = dirichlet_partition(y, train, 5, 0.3, seed=4)
    b = dirichlet_partition(y, np.random.default_rng(9).permutation(train), 5, 0.3, seed=4)  # order-free
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    _check_cover(a, train)
    assert min(len(s) for s in a) >= 2
    c = dirichlet_partition(y, train, 5, 0.3, seed=5)
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def _skew(y: np.ndarray, shards: list[np.ndarray]) -> float:
    """Mean share of each client's most common label (1/C for IID-like, 1 for one label each)."""
    return float(np.mean([np.bincount(y[s]).max() / len(s) for s in shards]))


def test_small_alpha_skews_labels_large_alpha_approaches_iid() -> None:
    y, train = _labels(3000, classes=4)
    small = np.mean([_skew(y, dirichlet_partition(y, train, 8, 0.1, seed=s)) for s in range(5)])
    large = np.mean([_skew(y, dirichlet_partition(y, train, 8, 100.0, seed=s)) for s in range(5)])
    assert small > 0.7 and large < 0.35, (small, large)


def test_impossible_dirichlet_partition_is_a_clear_error() -> None:
    y, train = _labels(60, classes=2)
    with pytest.raises(DataError, match="larger --alpha or fewer clients"):
        dirichlet_partition(y, train, 40, 0.01, seed=0)


def test_by_label_gives_each_client_its_own_labels() -> None:
    y, train = _labels(900, classes=3)
    shards = label_partition(y, train, 6, seed=1)
    _check_cover(shards, train)
    assert [set(np.unique(y[s]).tolist()) for s in shards] == [{0}, {1}, {2}, {0}, {1}, {2}]
    few = label_partition(y, train, 2, seed=1)  # fewer clients than classes
    _check_cover(few, train)
    assert [set(np.unique(y[s]).tolist()) for s in few] == [{0, 2}, {1}]
    with pytest.raises(DataError, match="without rows"):
        label_partition(np.array([0] * 10 + [1]), np.arange(11), 4, seed=0)  # 1 row of class 1, 2 owners


def test_iid_is_the_existing_sharding() -> None:
    spec = DataSpec()
    ds = load_dataset(spec)
    train, _ = split_indices(ds.y, spec.test_fraction, spec.seed)
    shards = partition_indices(spec, ds.y, train, 3)
    assert all(np.array_equal(s, shard_indices(train, 3, k, spec.seed)) for k, s in enumerate(shards))
    _x, y = load_shard(spec, 1, 3)
    assert np.array_equal(y, ds.y[shards[1]])
    data = load_client_data(spec, 1, 3)  # no validation rows by default: the same rows train
    assert np.array_equal(data.y, y) and len(data.y_val) == 0


def test_validation_split_is_deterministic_and_disjoint() -> None:
    fit, val = validation_split(50, 0.2, seed=3, shard=1)
    assert len(val) == 10 and len(fit) == 40 and not set(fit) & set(val)
    assert np.array_equal(val, validation_split(50, 0.2, seed=3, shard=1)[1])
    assert not np.array_equal(val, validation_split(50, 0.2, seed=3, shard=2)[1])
    assert len(validation_split(3, 0.01, 0, 0)[1]) == 1  # at least one row once asked for
    assert len(validation_split(7, 0.0, 0, 0)[1]) == 0
    with pytest.raises(DataError, match="too few"):
        validation_split(1, 0.5, 0, 0)


def test_client_data_label_histogram_and_partition_spec() -> None:
    spec = DataSpec(partition="dirichlet", alpha=0.3, val_fraction=0.2, seed=2)
    parts = [load_client_data(spec, k, 5) for k in range(5)]
    for p in parts:
        assert sum(p.label_counts()) == len(p.y) + len(p.y_val) and len(p.label_counts()) == 2
        assert len(p.y_val) >= 1
    ds = load_dataset(spec)
    train, _ = split_indices(ds.y, spec.test_fraction, spec.seed)
    assert sum(len(p.y) + len(p.y_val) for p in parts) == len(train)
    _x, y = load_shard(spec, 3, 5)
    assert len(y) == len(parts[3].y) + len(parts[3].y_val)


def test_data_spec_partition_fields_are_checked() -> None:
    assert DataSpec.from_dict({"partition": "by-label", "alpha": 1, "val_fraction": 0}).alpha == 1.0
    for kw, msg in [({"partition": "zipf"}, "unknown partition"), ({"alpha": 0.0}, "alpha"),
                    ({"val_fraction": 1.0}, "val_fraction"), ({"alpha": float("inf")}, "alpha")]:
        with pytest.raises(DataError, match=msg):
            dataclasses.replace(DataSpec(), **kw).validate()
    with pytest.raises(DataError, match="partition must be a string"):
        DataSpec.from_dict({"partition": None})


def test_check_partition_fails_fast_with_the_reason() -> None:
    from fedq.learning.partition import check_partition

    check_partition(DataSpec(partition="dirichlet", alpha=0.3, val_fraction=0.2), 5)
    with pytest.raises(DataError, match="larger --alpha"):
        check_partition(DataSpec(partition="dirichlet", alpha=0.001), 60)


def test_the_partition_is_computed_once_for_all_the_clients_of_a_process() -> None:
    """A simulation's clients share a process: each must not recompute every shard (N x N)."""
    from fedq.learning.partition import _partition

    spec = DataSpec(source="synthetic", rows=400, features=3, seed=11)
    _partition.cache_clear()
    parts = [load_client_data(spec, k, 40) for k in range(40)]
    assert _partition.cache_info().misses == 1 and _partition.cache_info().hits == 39
    assert sum(len(p.y) + len(p.y_val) for p in parts) == len(split_indices(load_dataset(spec).y, 0.2, 11)[0])
