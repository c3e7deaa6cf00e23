"""Federated standardisation: each client's per-feature statistics (no rows), their combination,
and the global scaler the aggregator builds from them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedq.errors import DataError
from fedq.learning.dataspec import is_int, is_number

# Below this std a feature is treated as constant: dividing by it would only amplify noise.
_MIN_STD = 1e-12
# Relative size of float rounding in E[x^2] - mean^2; a smaller variance is indistinguishable from 0.
_VAR_RTOL = 1e-12


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison has no single truth value
class FeatureStats:
    """Per-feature count, sum and sum of squares of non-missing values; safe to share (no rows)."""

    count: np.ndarray  # int64 (d,) non-missing values per feature
    total: np.ndarray  # float64 (d,) sum of non-missing values
    total_sq: np.ndarray  # float64 (d,) sum of squares
    rows: int

    @property
    def num_features(self) -> int:
        """Number of features the statistics cover."""
        return int(len(self.count))

    def to_dict(self) -> dict[str, Any]:
        """Plain lists of python numbers, for msgpack."""
        return {
            "count": [int(v) for v in self.count],
            "total": [float(v) for v in self.total],
            "total_sq": [float(v) for v in self.total_sq],
            "rows": int(self.rows),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureStats:
        """Rebuild from to_dict output, rejecting anything inconsistent with DataError."""
        if not isinstance(d, Mapping):
            raise DataError(f"feature stats must be a mapping, got {type(d).__name__}")
        expected = {"count", "total", "total_sq", "rows"}
        missing = sorted(expected - set(d))
        unknown = sorted(str(k) for k in d if k not in expected)
        if missing or unknown:
            raise DataError(
                f"feature stats keys wrong (missing: {', '.join(missing) or 'none'}; "
                f"unknown: {', '.join(unknown) or 'none'})"
            )
        rows = d["rows"]
        if not is_int(rows) or rows < 0:
            raise DataError(f"feature stats rows must be a non-negative integer, got {rows!r}")
        count = _number_list(d["count"], "count")
        total = _number_list(d["total"], "total")
        total_sq = _number_list(d["total_sq"], "total_sq")
        if not len(count) == len(total) == len(total_sq):
            raise DataError(
                f"feature stats lengths differ: count {len(count)}, total {len(total)}, "
                f"total_sq {len(total_sq)}"
            )
        if not np.all(count == np.round(count)):
            raise DataError("feature stats count must hold integers")
        if np.any(count < 0) or np.any(count > rows):
            raise DataError(f"feature stats count must be between 0 and rows ({rows})")
        if np.any(total_sq < 0):
            raise DataError("feature stats total_sq must not be negative")
        return cls(count=count.astype(np.int64), total=total, total_sq=total_sq, rows=int(rows))


def _number_list(value: Any, name: str) -> np.ndarray:
    """A list of finite numbers as float64, or DataError naming the field."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise DataError(f"feature stats {name} must be a list, got {type(value).__name__}")
    if not all(is_number(v) for v in value):
        raise DataError(f"feature stats {name} must hold only numbers")
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"feature stats {name} must hold only finite numbers")
    return arr


def feature_stats(x: np.ndarray) -> FeatureStats:
    """Per-feature count/sum/sum of squares over the non-missing (non-NaN) values of x."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"features must be a 2-D array, got shape {x.shape}")
    if np.isinf(x).any():
        raise DataError("features contain infinite values")
    present = ~np.isnan(x)
    filled = np.where(present, x, 0.0)
    return FeatureStats(
        count=present.sum(axis=0).astype(np.int64),
        total=filled.sum(axis=0),
        total_sq=np.square(filled).sum(axis=0),
        rows=int(x.shape[0]),
    )


def combine_stats(parts: Sequence[FeatureStats]) -> FeatureStats:
    """Pool several clients' statistics by adding counts and sums."""
    parts = list(parts)
    if not parts:
        raise DataError("no feature statistics to combine")
    d = parts[0].num_features
    for i, part in enumerate(parts):
        if part.num_features != d:
            raise DataError(
                f"feature count mismatch: part 0 has {d} features but part {i} has {part.num_features}"
            )
    return FeatureStats(
        count=np.sum([p.count for p in parts], axis=0).astype(np.int64),
        total=np.sum([p.total for p in parts], axis=0).astype(np.float64),
        total_sq=np.sum([p.total_sq for p in parts], axis=0).astype(np.float64),
        rows=int(sum(p.rows for p in parts)),
    )


def scaler_from_stats(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per feature from pooled sums, using the population variance."""
    count = np.asarray(stats.count, dtype=np.float64)
    seen = count > 0
    safe = np.where(seen, count, 1.0)
    mean = np.where(seen, stats.total / safe, 0.0)
    mean_sq = np.where(seen, stats.total_sq / safe, 0.0)
    var = mean_sq - np.square(mean)
    # E[x^2] - mean^2 cancels badly for near-constant features (e.g. a column that is always 100):
    # anything within rounding noise of E[x^2], including small negatives, is really zero variance.
    var = np.where(var <= _VAR_RTOL * mean_sq, 0.0, var)
    std = np.sqrt(var)
    std = np.where(std < _MIN_STD, 1.0, std)
    return mean.astype(np.float64), std.astype(np.float64)


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """float32 (x - mean) / std, with missing values imputed as 0 (the mean)."""
    x = np.asarray(x, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if x.ndim != 2 or mean.shape != (x.shape[1],) or std.shape != (x.shape[1],):
        raise DataError(
            f"cannot standardize features of shape {x.shape} with mean {mean.shape} and std {std.shape}"
        )
    z = (x - mean) / std
    z[np.isnan(z)] = 0.0
    return np.asarray(z, dtype=np.float32)
