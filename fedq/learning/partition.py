"""Partitioning for simulations: which training rows each client holds, and its validation rows.

``iid`` (the default) deals shuffled rows evenly; ``dirichlet`` skews labels by drawing each
class's client shares from Dirichlet(alpha); ``by-label`` gives each client only its own label(s).
All are deterministic functions of (labels, number of clients, parameters, seed), so every
client derives its own shard alone, and no rows are exchanged.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import numpy as np

from fedq.errors import DataError
from fedq.learning.data import _check_seed, load_dataset, shard_indices, split_indices
from fedq.learning.dataspec import DataSpec, is_int, is_number

# A Dirichlet draw that leaves a client fewer rows than this is drawn again (at most _MAX_DRAWS times).
MIN_PARTITION_ROWS = 2
_MAX_DRAWS = 100


def _check_shards(num_shards: int, shard: int | None = None) -> None:
    if not is_int(num_shards) or num_shards < 1:
        raise DataError(f"num_shards must be an integer >= 1, got {num_shards!r}")
    if shard is not None and (not is_int(shard) or not 0 <= shard < num_shards):
        raise DataError(f"shard {shard} is out of range for {num_shards} shards (0..{num_shards - 1})")


def dirichlet_partition(y: np.ndarray, train_idx: np.ndarray, num_shards: int, alpha: float,
                        seed: int, min_rows: int = MIN_PARTITION_ROWS) -> list[np.ndarray]:
    """Label-skewed shards: each class's rows are dealt to clients in Dirichlet(alpha) proportions.

    Small alpha gives each client few labels, large alpha approaches IID (Hsu et al., 2019, as in
    flwr-datasets' DirichletPartitioner). A draw leaving a client fewer than min_rows rows is drawn
    again from the same stream, so the result depends on (labels, shards, alpha, seed) only."""
    _check_shards(num_shards)
    _check_seed(seed)
    if not is_number(alpha) or not float(alpha) > 0:
        raise DataError(f"alpha must be a positive number, got {alpha!r}")
    base = np.sort(np.asarray(train_idx)).astype(np.int64)
    labels = np.asarray(y)[base]
    rng = np.random.default_rng([seed, 2])
    for _ in range(_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        for cls in np.unique(labels):
            members = rng.permutation(base[labels == cls])
            share = rng.dirichlet(np.full(num_shards, float(alpha)))
            cuts = np.floor(np.cumsum(share)[:-1] * len(members)).astype(np.int64)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].append(chunk)
        shards = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(s) for s in shards) >= min_rows:
            return shards
    raise DataError(f"a Dirichlet partition with alpha {alpha:g} over {num_shards} clients left some client "
                    f"fewer than {min_rows} rows in {_MAX_DRAWS} draws; use a larger --alpha or fewer clients")


def label_partition(y: np.ndarray, train_idx: np.ndarray, num_shards: int, seed: int) -> list[np.ndarray]:
    """Shards by label: with K >= C clients, client k holds only class k mod C (a class's rows split
    evenly among its clients); with fewer clients than classes, client k holds classes c with c mod K = k."""
    _check_shards(num_shards)
    _check_seed(seed)
    base = np.sort(np.asarray(train_idx)).astype(np.int64)
    labels = np.asarray(y)[base]
    classes = np.unique(labels)
    rng = np.random.default_rng([seed, 3])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
    for ci, cls in enumerate(classes):
        members = rng.permutation(base[labels == cls])
        owners = [k for k in range(num_shards) if k % len(classes) == ci] if num_shards >= len(classes) \
            else [ci % num_shards]
        for k, chunk in zip(owners, np.array_split(members, len(owners))):
            parts[k].append(chunk)
    shards = [np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64) for p in parts]
    empty = [k for k, s in enumerate(shards) if len(s) == 0]
    if empty:
        raise DataError(f"a by-label partition over {num_shards} clients leaves client(s) {empty} without rows")
    return shards


def partition_indices(spec: DataSpec, y: np.ndarray, train_idx: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """Every client's sorted training rows under the spec's partition (IID, Dirichlet or by label)."""
    _check_shards(num_shards)
    if spec.partition == "dirichlet":
        return dirichlet_partition(y, train_idx, num_shards, spec.alpha, spec.seed)
    if spec.partition == "by-label":
        return label_partition(y, train_idx, num_shards, spec.seed)
    return [shard_indices(train_idx, num_shards, k, spec.seed) for k in range(num_shards)]


def validation_split(n: int, fraction: float, seed: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, validation positions) within a shard of n rows, both sorted.

    fraction 0 holds nothing out; otherwise round(fraction x n) rows, at least one, and at least
    one row is left to train on."""
    if fraction <= 0:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    n_val = max(1, int(math.floor(n * float(fraction) + 0.5)))
    if n - n_val < 1:
        raise DataError(f"shard {shard} has {n} row(s): too few to hold out validation rows and still train")
    pos = np.random.default_rng([seed, 4, shard]).permutation(n)
    return np.sort(pos[n_val:]).astype(np.int64), np.sort(pos[:n_val]).astype(np.int64)


@dataclass(frozen=True, eq=False)
class ClientData:
    """One client's rows: training rows, held-out validation rows, and the label set's size."""

    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int

    def label_counts(self) -> list[int]:
        """Rows per class over the client's whole shard (training and validation rows)."""
        counts = np.bincount(np.concatenate([self.y, self.y_val]), minlength=self.num_classes)
        return [int(c) for c in counts]


_PARTITION_LOCK = threading.Lock()


@functools.lru_cache(maxsize=2)
def _partition(spec: DataSpec, num_shards: int) -> tuple[np.ndarray, ...]:
    ds = load_dataset(spec)
    train_idx, _ = split_indices(ds.y, spec.test_fraction, spec.seed)
    return tuple(partition_indices(spec, ds.y, train_idx, num_shards))


def shard_rows(spec: DataSpec, shard: int, num_shards: int) -> np.ndarray:
    """One client's training rows. The whole partition is computed once per process (under a
    lock): a simulation's thousand clients in one process would otherwise each compute all
    thousand shards, N x N work."""
    with _PARTITION_LOCK:
        return _partition(spec, num_shards)[shard]


def load_client_data(spec: DataSpec, shard: int, num_shards: int) -> ClientData:
    """Only this client's rows, split into training and validation rows (x float64 with NaN)."""
    _check_shards(num_shards, shard)
    ds = load_dataset(spec)
    idx = shard_rows(spec, shard, num_shards)
    fit, val = validation_split(len(idx), spec.val_fraction, spec.seed, shard)
    return ClientData(x=ds.x[idx[fit]], y=ds.y[idx[fit]], x_val=ds.x[idx[val]], y_val=ds.y[idx[val]],
                      num_classes=ds.num_classes)


def check_partition(spec: DataSpec, num_shards: int) -> None:
    """DataError, before any process starts, when the partition cannot give every client rows
    (and, with validation rows, rows to train on too)."""
    ds = load_dataset(spec)
    train_idx, _ = split_indices(ds.y, spec.test_fraction, spec.seed)
    for k, idx in enumerate(partition_indices(spec, ds.y, train_idx, num_shards)):
        validation_split(len(idx), spec.val_fraction, spec.seed, k)


def load_shard(spec: DataSpec, shard: int, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """This client's whole shard (training and validation rows): (x float64 with NaN, y int64)."""
    ds = load_dataset(spec)
    train_idx, _ = split_indices(ds.y, spec.test_fraction, spec.seed)
    if spec.partition == "iid":
        idx = shard_indices(train_idx, num_shards, shard, spec.seed)
    else:
        if not is_int(shard) or not is_int(num_shards) or not 0 <= shard < num_shards:
            raise DataError(f"shard {shard} is out of range for {num_shards} shards (0..{num_shards - 1})")
        idx = partition_indices(spec, ds.y, train_idx, num_shards)[shard]
    return ds.x[idx], ds.y[idx]
