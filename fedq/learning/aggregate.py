"""Aggregation math: pure numpy, free of Redis and Keras.

FedAvg (McMahan et al., 2017) is the sample-weighted mean of client weights. It is
computed as a running float64 sum so that memory is one model, whatever the number
of clients, and updates are folded in as they arrive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fedq.protocol.chunking import slices_at

# add() multiplies in blocks through one small float64 buffer: memory stays the float64 sum
# (not twice it), and each block stays in cache between the multiply and the add.
BLOCK = 1 << 18


class FedAvg:
    """Running sample-weighted sum of models; ``result()`` gives the weighted mean."""

    def __init__(self, template: Sequence[np.ndarray]) -> None:
        self._dtypes = [np.dtype(t.dtype) for t in template]
        self._sum = [np.zeros(t.shape, dtype=np.float64) for t in template]
        self._flat = [acc.reshape(-1) for acc in self._sum]
        self._starts = np.cumsum([0] + [acc.size for acc in self._sum])
        self._scratch = np.empty(min(BLOCK, max([acc.size for acc in self._sum] + [1])), dtype=np.float64)
        self.total_examples = 0
        self.count = 0

    def add(self, tensors: Sequence[np.ndarray], num_examples: int) -> None:
        """Fold one model weighted by its sample count (shapes must match the template)."""
        if len(tensors) != len(self._sum):
            raise ValueError(f"expected {len(self._sum)} tensors, got {len(tensors)}")
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        for acc, t in zip(self._sum, tensors):
            if np.shape(t) != acc.shape:  # numpy would broadcast a smaller tensor silently
                raise ValueError(f"tensor of shape {np.shape(t)} where the model has {acc.shape}")
        for i, t in enumerate(tensors):
            self._fold(self._flat[i], np.asarray(t).reshape(-1), num_examples)
        self.count_model(num_examples)

    def add_part(self, offset: int, values: np.ndarray, num_examples: int) -> None:
        """Fold one part of a model sent in parts: a slice of its flattened parameters starting
        at ``offset``. Call count_model() once every part of that model is in."""
        if offset < 0 or offset + values.size > self._starts[-1]:
            raise ValueError(f"part [{offset}, {offset + values.size}) outside the model's "
                             f"{self._starts[-1]} parameters")
        for i, (lo, hi, src) in slices_at(self._starts, offset, values.size):
            self._fold(self._flat[i][lo:hi], values[src:src + hi - lo], num_examples)

    def count_model(self, num_examples: int) -> None:
        """Count one model whose parameters were all folded."""
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        self.total_examples += int(num_examples)
        self.count += 1

    def _fold(self, acc: np.ndarray, flat: np.ndarray, num_examples: int) -> None:
        weight = np.float64(num_examples)  # a float64 scalar makes the multiply loop float64
        for a in range(0, flat.size, BLOCK):
            b = min(a + BLOCK, flat.size)
            buf = self._scratch[:b - a]
            np.multiply(flat[a:b], weight, out=buf)
            np.add(acc[a:b], buf, out=acc[a:b])

    def reset(self) -> None:
        """Forget everything folded so far (used when an update is replaced)."""
        for acc in self._sum:
            acc.fill(0.0)
        self.total_examples = 0
        self.count = 0

    def result(self) -> list[np.ndarray]:
        """The weighted mean, cast back to each tensor's original dtype."""
        scale = self._scale()
        out = []
        for acc, flat, dt in zip(self._sum, self._flat, self._dtypes):
            result = np.empty(acc.shape, dtype=dt)
            self._mean_into(flat, result.reshape(-1), scale)
            out.append(result)
        return out

    def result_slice(self, offset: int, length: int) -> np.ndarray:
        """Parameters [offset, offset + length) of the weighted mean, flattened in tensor order,
        in the model's dtype (one dtype throughout): the result one part at a time, so a model
        written out in parts never exists whole beside its float64 sum."""
        if len(set(self._dtypes)) != 1:
            raise ValueError("result_slice needs tensors of one dtype")
        if offset < 0 or length < 0 or offset + length > self._starts[-1]:
            raise ValueError(f"slice [{offset}, {offset + length}) outside the model's {self._starts[-1]} parameters")
        scale = self._scale()
        out = np.empty(length, dtype=self._dtypes[0])
        for i, (lo, hi, dst) in slices_at(self._starts, offset, length):
            self._mean_into(self._flat[i][lo:hi], out[dst:dst + hi - lo], scale)
        return out

    def _scale(self) -> np.float64:
        if self.total_examples == 0:
            raise ValueError("no updates were aggregated")
        return np.float64(1.0 / self.total_examples)

    def _mean_into(self, flat: np.ndarray, dest: np.ndarray, scale: np.float64) -> None:
        # Block by block through the scratch buffer: no full-size float64 temporary.
        for a in range(0, flat.size, BLOCK):
            b = min(a + BLOCK, flat.size)
            buf = self._scratch[:b - a]
            np.multiply(flat[a:b], scale, out=buf)
            dest[a:b] = buf


def fedavg(models: Iterable[tuple[Sequence[np.ndarray], int]]) -> list[np.ndarray]:
    """FedAvg of (tensors, num_examples) pairs; convenience over the streaming class."""
    acc: FedAvg | None = None
    for tensors, n in models:
        if acc is None:
            acc = FedAvg(tensors)
        acc.add(tensors, n)
    if acc is None:
        raise ValueError("no models to aggregate")
    return acc.result()


def weighted_metrics(items: Iterable[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Sample-weighted mean of each metric name over the clients that reported it."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for metrics, n in items:
        for name, value in metrics.items():
            if value is None or not np.isfinite(value):
                continue
            sums[name] = sums.get(name, 0.0) + float(value) * n
            weights[name] = weights.get(name, 0) + n
    return {name: sums[name] / weights[name] for name in sums if weights[name] > 0}


def capped_weights(counts: Mapping[str, int], max_share: float) -> dict[str, int]:
    """Weights for a mean in which no one model carries more than max_share of the total.

    Sample counts are what clients claim; the largest are lowered to a common cap T with
    T = max_share x (sum of the new weights), which leaves every other count as it was (the
    fixed point is found largest-first). Weights stay whole numbers (caps round down, which
    only lowers a capped share). When max_share x len(counts) < 1 no weighting can meet the
    cap, and every model gets the same weight (the smallest share possible)."""
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    if any(c <= 0 for c in counts.values()):
        raise ValueError("counts must be positive")
    if not counts:
        return {}
    order = sorted(counts, key=lambda k: counts[k], reverse=True)
    if max_share * len(order) < 1:
        low = min(counts.values())
        return {k: low for k in counts}
    total = sum(counts.values())
    for m in range(len(order)):
        if m * max_share >= 1:
            break
        rest = total - sum(counts[k] for k in order[:m])
        cap = max_share * rest / (1 - m * max_share)
        if counts[order[m]] <= cap:
            return {k: counts[k] if counts[k] <= cap else max(1, int(cap)) for k in counts}
    low = min(counts.values())  # not reached: max_share x n >= 1 leaves a fixed point
    return {k: low for k in counts}
