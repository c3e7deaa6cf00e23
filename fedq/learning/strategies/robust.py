"""Combiners: how one round's client models become one model (pure numpy).

``Mean`` is FedAvg's sample-weighted mean, streaming: it folds each update into a float64
running sum as it arrives, so its memory is one model whatever the number of clients.

The robust combiners need every update of the round at once, so they HOLD ALL N UPDATES
(N x model size; the aggregator refuses to start a run whose N x model size exceeds the
run's cap, see ``StrategySpec.max_held_mb``). They weigh every client equally, whatever
sample count it claims, because a malicious client could claim any count:

- ``Median``: coordinate-wise median (Yin et al., 2018).
- ``TrimmedMean``: coordinate-wise mean after dropping the ``floor(beta * n)`` largest and
  smallest values of each coordinate (Yin et al., 2018).
- ``Krum``: the update whose summed squared distance to its ``n - f - 2`` nearest neighbours
  is smallest (Blanchard et al., 2017); with ``keep = m > 1`` (Multi-Krum) the ``m`` best
  such updates, averaged weighted by their sample counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedq.learning.aggregate import FedAvg


class Mean(FedAvg):
    """FedAvg's streaming weighted mean, with the combiner interface (memory: one model)."""

    holds_all = False

    def add(self, tensors: Sequence[np.ndarray], num_examples: int, client_id: str = "") -> None:
        super().add(tensors, num_examples)

    def info(self) -> dict[str, Any]:
        return {}


class Buffered:
    """Keeps the round's updates (tensors, sample count, client id) until result()."""

    holds_all = True

    def __init__(self, template: Sequence[np.ndarray]) -> None:
        self._shapes = [np.shape(t) for t in template]
        self._dtypes = [np.asarray(t).dtype for t in template]
        self._items: list[tuple[list[np.ndarray], int, str]] = []

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def total_examples(self) -> int:
        return sum(n for _, n, _ in self._items)

    def add(self, tensors: Sequence[np.ndarray], num_examples: int, client_id: str = "") -> None:
        """Hold one update (shapes must match the template)."""
        if len(tensors) != len(self._shapes):
            raise ValueError(f"expected {len(self._shapes)} tensors, got {len(tensors)}")
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        for t, shape in zip(tensors, self._shapes):
            if np.shape(t) != shape:
                raise ValueError(f"tensor of shape {np.shape(t)} where the model has {shape}")
        self._items.append(([np.asarray(t) for t in tensors], int(num_examples), client_id))

    def reset(self) -> None:
        self._items = []

    def _stack(self, i: int) -> np.ndarray:
        """Tensor i of every held update as one float64 array of shape (n, *shape)."""
        return np.stack([np.asarray(ts[i], dtype=np.float64) for ts, _, _ in self._items])

    def result(self) -> list[np.ndarray]:
        """The round's combined model (each robust combiner defines its own)."""
        raise NotImplementedError

    def _check(self) -> None:
        if not self._items:
            raise ValueError("no updates were aggregated")

    def info(self) -> dict[str, Any]:
        return {}


class Median(Buffered):
    """Coordinate-wise median of the held updates (unweighted)."""

    def result(self) -> list[np.ndarray]:
        self._check()
        return [np.asarray(np.median(self._stack(i), axis=0)).astype(dt)
                for i, dt in enumerate(self._dtypes)]


class TrimmedMean(Buffered):
    """Coordinate-wise mean without the floor(beta * n) largest and smallest values (unweighted)."""

    def __init__(self, template: Sequence[np.ndarray], beta: float) -> None:
        super().__init__(template)
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"trim fraction must be in [0, 0.5), got {beta}")
        self.beta = beta

    def trimmed(self, n: int) -> int:
        """How many values are dropped at each end for n updates (always leaves at least one)."""
        return min(int(np.floor(self.beta * n + 1e-9)), (n - 1) // 2)

    def result(self) -> list[np.ndarray]:
        self._check()
        n = self.count
        k = self.trimmed(n)
        out = []
        for i, dt in enumerate(self._dtypes):
            stacked = np.sort(self._stack(i), axis=0)
            out.append(np.asarray(stacked[k:n - k].mean(axis=0)).astype(dt))
        return out

    def info(self) -> dict[str, Any]:
        return {"trimmed_per_side": self.trimmed(self.count)}


class Krum(Buffered):
    """Krum (keep=1) and Multi-Krum (keep=m): the updates closest to their neighbours."""

    def __init__(self, template: Sequence[np.ndarray], byzantine: int, keep: int | None) -> None:
        super().__init__(template)
        if byzantine < 0:
            raise ValueError(f"byzantine count must be 0 or more, got {byzantine}")
        self.byzantine = byzantine
        self.keep = keep  # None: n - f (Multi-Krum's usual choice)
        self._selected: list[str] = []

    def distances(self) -> np.ndarray:
        """(n, n) squared Euclidean distances between the held updates, over all tensors."""
        n = self.count
        dist = np.zeros((n, n), dtype=np.float64)
        for i in range(len(self._dtypes)):
            flat = self._stack(i).reshape(n, -1)
            for a in range(n):
                # Direct differences, not |a|^2 + |b|^2 - 2ab: no cancellation for close updates.
                dist[a] += np.square(flat - flat[a]).sum(axis=1)
        return dist

    def scores(self, dist: np.ndarray) -> np.ndarray:
        """Krum score of each update: summed distances to its n - f - 2 nearest others."""
        n = len(dist)
        if n == 1:
            return np.zeros(1)
        # n - f - 2 neighbours as in the paper; at least one, at most all others, so that a
        # round closed with fewer updates than planned (quorum) still has a defined score.
        k = min(max(n - self.byzantine - 2, 1), n - 1)
        others = np.sort(dist + np.diag(np.full(n, np.inf)), axis=1)[:, :k]
        return np.asarray(others.sum(axis=1))

    def result(self) -> list[np.ndarray]:
        self._check()
        n = self.count
        score = self.scores(self.distances())
        keep = self.keep if self.keep is not None else max(n - self.byzantine, 1)
        keep = min(max(keep, 1), n)
        # Stable order: ties go to the earlier-added update, deterministically.
        best = np.argsort(score, kind="stable")[:keep]
        self._selected = [self._items[b][2] for b in best]
        acc = FedAvg(self._items[0][0])
        for b in best:
            ts, num, _ = self._items[b]
            acc.add(ts, num)
        return acc.result()

    def info(self) -> dict[str, Any]:
        return {"selected": list(self._selected)}


def make_combiner(kind: str, template: Sequence[np.ndarray], *, trim_fraction: float = 0.2,
                  byzantine: int = 1, keep: int | None = None) -> Mean | Buffered:
    """The combiner named kind: mean | median | trimmed | krum."""
    if kind == "mean":
        return Mean(template)
    if kind == "median":
        return Median(template)
    if kind == "trimmed":
        return TrimmedMean(template, trim_fraction)
    if kind == "krum":
        return Krum(template, byzantine, keep)
    raise ValueError(f"unknown combiner {kind!r}")
