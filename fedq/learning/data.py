"""Dataset loading, deterministic train/test splitting, partitioning and federated feature statistics.

Every client derives the same split from the same ``DataSpec`` (no rows are exchanged), keeps only
its own shard, and reports per-feature sums and counts so the aggregator can build a global scaler.
Shards are IID (the default), Dirichlet label-skewed, or by label; a client may hold out part of its
shard as validation rows for federated evaluation.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from fedq.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

SOURCES = ("breast_cancer", "seed", "csv", "synthetic")
PARTITIONS = ("iid", "dirichlet", "by-label")  # implemented in fedq.learning.partition
SEED_CLASS_NAMES = ["normal", "abnormal"]
SEED_MISSING_VALUE = -1.0

# Below this std a feature is treated as constant: dividing by it would only amplify noise.
_MIN_STD = 1e-12
# Relative size of float rounding in E[x^2] - mean^2; a smaller variance is indistinguishable from 0.
_VAR_RTOL = 1e-12


def _is_int(value: Any) -> bool:
    """True for a real integer (bool excluded, since True/False are almost always a mistake here)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    """True for an int or float that is not a bool."""
    return _is_int(value) or isinstance(value, (float, np.floating))


@dataclass(frozen=True)
class DataSpec:
    """Where a run's data comes from and how it is split; stored in Redis as part of the run spec."""

    source: str = "breast_cancer"  # "breast_cancer" | "seed" (normal/abnormal CSV pair) | "csv"
    normal_csv: str | None = None  # for source "seed"
    abnormal_csv: str | None = None
    csv: str | None = None  # for source "csv": a headed CSV with a label column
    label_column: str | None = None
    missing_value: float | None = None  # a sentinel meaning missing; NaN/empty cells are always missing
    test_fraction: float = 0.2
    seed: int = 0
    partition: str = "iid"  # how training rows are dealt to clients: "iid" | "dirichlet" | "by-label"
    alpha: float = 0.5  # Dirichlet concentration: small = each client sees few labels
    val_fraction: float = 0.0  # share of each client's shard held out for federated evaluation
    rows: int = 10_000  # for source "synthetic": generated rows (scale tests with many clients)
    features: int = 20  # for source "synthetic": generated features

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (msgpack/JSON friendly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataSpec:
        """Build a spec from a dict; unknown keys or wrongly typed values raise DataError."""
        if not isinstance(d, Mapping):
            raise DataError(f"data spec must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise DataError(
                f"unknown data spec key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        kw: dict[str, Any] = dict(d)
        for name in ("source", "normal_csv", "abnormal_csv", "csv", "label_column", "partition"):
            value = kw.get(name)
            if name in kw and value is not None and not isinstance(value, str):
                raise DataError(f"data spec {name} must be a string, got {value!r}")
        if "source" in kw and kw["source"] is None:
            raise DataError("data spec source must be a string, got None")
        # Numbers may arrive as ints after a msgpack/JSON round trip; normalise to the declared types.
        for name in ("test_fraction", "missing_value", "alpha", "val_fraction"):
            if name in kw and kw[name] is not None:
                if not _is_number(kw[name]):
                    raise DataError(f"data spec {name} must be a number, got {kw[name]!r}")
                kw[name] = float(kw[name])
        for name in ("test_fraction", "alpha", "val_fraction"):
            if name in kw and kw[name] is None:
                raise DataError(f"data spec {name} must be a number, got None")
        if "partition" in kw and kw["partition"] is None:
            raise DataError("data spec partition must be a string, got None")
        for name in ("rows", "features"):
            if name in kw and not _is_int(kw[name]):
                raise DataError(f"data spec {name} must be an integer, got {kw[name]!r}")
        if "seed" in kw:
            seed = kw["seed"]
            if _is_number(seed) and float(seed).is_integer():
                kw["seed"] = int(seed)
            else:
                raise DataError(f"data spec seed must be an integer, got {seed!r}")
        return cls(**kw)

    def validate(self) -> None:
        """Check the spec is usable (paths given for the source, sane fraction); raise DataError if not."""
        if self.source not in SOURCES:
            raise DataError(f"unknown data source {self.source!r} (expected one of: {', '.join(SOURCES)})")
        if self.source == "seed":
            for name in ("normal_csv", "abnormal_csv"):
                if not getattr(self, name):
                    raise DataError(f"data source 'seed' needs {name} (path to the {name[:-4]} CSV)")
        if self.source == "csv":
            if not self.csv:
                raise DataError("data source 'csv' needs csv (path to a headed CSV file)")
            if not self.label_column:
                raise DataError("data source 'csv' needs label_column (name of the label column)")
        if self.source == "synthetic" and (self.rows < 10 or self.features < 2):
            raise DataError(f"synthetic data needs at least 10 rows and 2 features, got {self.rows} x {self.features}")
        if not _is_number(self.test_fraction) or not 0.0 < float(self.test_fraction) < 1.0:
            raise DataError(f"test_fraction must be strictly between 0 and 1, got {self.test_fraction!r}")
        if not _is_int(self.seed) or self.seed < 0:
            # numpy's seeding rejects negative ints, so catch it here with a clearer message.
            raise DataError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.missing_value is not None and (
            not _is_number(self.missing_value) or not math.isfinite(self.missing_value)
        ):
            raise DataError(f"missing_value must be a finite number or None, got {self.missing_value!r}")
        if self.partition not in PARTITIONS:
            raise DataError(f"unknown partition {self.partition!r} (expected one of: {', '.join(PARTITIONS)})")
        if not _is_number(self.alpha) or not math.isfinite(float(self.alpha)) or not float(self.alpha) > 0:
            raise DataError(f"alpha must be a positive number, got {self.alpha!r}")
        if not _is_number(self.val_fraction) or not 0.0 <= float(self.val_fraction) < 1.0:
            raise DataError(f"val_fraction must be at least 0 and below 1, got {self.val_fraction!r}")


def seed_spec(normal_csv: str, abnormal_csv: str, **kw: Any) -> DataSpec:
    """A "seed" spec for a normal/abnormal CSV pair; missing_value defaults to -1.0."""
    if "source" in kw:
        raise DataError("seed_spec always uses source 'seed'; do not pass source")
    kw.setdefault("missing_value", SEED_MISSING_VALUE)
    return DataSpec(source="seed", normal_csv=normal_csv, abnormal_csv=abnormal_csv, **kw)


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison has no single truth value
class Dataset:
    """Features and integer class labels for every row of a data source."""

    x: np.ndarray  # float64 (n, d); missing = NaN
    y: np.ndarray  # int64 (n,), classes 0..C-1
    feature_names: list[str]
    class_names: list[str]

    @property
    def num_features(self) -> int:
        """Number of feature columns."""
        return int(self.x.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


# ---------------------------------------------------------------- loading


def _read_csv(path: str, what: str, header: int | None) -> pd.DataFrame:
    """Read a CSV (BOM tolerated, any line ending), turning every failure into a DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}")
    import pandas as pd  # lazy: the dashboard, `fedq status` and their slim installs go without pandas

    try:
        df = pd.read_csv(path, header=header, encoding="utf-8-sig", skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{what} is empty: {path}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{what} could not be parsed ({path}): {exc}") from None
    except OSError as exc:
        raise DataError(f"{what} could not be read ({path}): {exc}") from None
    if len(df) == 0:
        raise DataError(f"{what} has no data rows: {path}")
    return df


def _numeric_matrix(df: pd.DataFrame, path: str, names: Sequence[str]) -> np.ndarray:
    """Convert every column of df to float64, naming file, column and a bad value on failure."""
    import pandas as pd

    columns = []
    for col, name in zip(df.columns, names):
        series = df[col]
        if pd.api.types.is_bool_dtype(series):
            # pandas parses True/False as bools, which would silently become 1/0.
            raise DataError(f"column {name} in {path} is not numeric (e.g. {series.iloc[0]!r})")
        if not pd.api.types.is_numeric_dtype(series):
            converted = pd.to_numeric(series.astype("string").str.strip(), errors="coerce")
            bad = series.notna() & converted.isna()
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataError(
                    f"column {name} in {path} is not numeric (e.g. {series.iloc[row]!r} at data row {row + 1})"
                )
            series = converted
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isinf(values).any():
            row = int(np.flatnonzero(np.isinf(values))[0])
            raise DataError(f"column {name} in {path} has an infinite value at data row {row + 1}")
        columns.append(values)
    return np.column_stack(columns) if columns else np.empty((len(df), 0), dtype=np.float64)


def _load_seed(spec: DataSpec) -> Dataset:
    """Load the normal (class 0) / abnormal (class 1) CSV pair, which has no header row."""
    assert spec.normal_csv and spec.abnormal_csv  # load_dataset validated the spec
    normal_path = os.fspath(spec.normal_csv)
    abnormal_path = os.fspath(spec.abnormal_csv)
    normal = _read_csv(normal_path, "normal CSV", header=None)
    abnormal = _read_csv(abnormal_path, "abnormal CSV", header=None)
    if normal.shape[1] != abnormal.shape[1]:
        raise DataError(
            f"normal CSV has {normal.shape[1]} columns but abnormal CSV has {abnormal.shape[1]} "
            f"({normal_path}, {abnormal_path})"
        )
    names = [f"f{i}" for i in range(normal.shape[1])]
    x_normal = _numeric_matrix(normal, normal_path, names)
    x_abnormal = _numeric_matrix(abnormal, abnormal_path, names)
    x = np.vstack([x_normal, x_abnormal])
    y = np.concatenate(
        [np.zeros(len(x_normal), dtype=np.int64), np.ones(len(x_abnormal), dtype=np.int64)]
    )
    return Dataset(x=x, y=y, feature_names=names, class_names=list(SEED_CLASS_NAMES))


def _encode_labels(labels: pd.Series, column: str, path: str) -> tuple[np.ndarray, list[str]]:
    """Map label values to 0..C-1 in sorted order; integers sort numerically, anything else as text."""
    import pandas as pd

    missing = labels.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{int(missing.sum())} row(s) have no label in column {column!r} of {path} "
            f"(first at data row {first + 1})"
        )
    if pd.api.types.is_numeric_dtype(labels) and not pd.api.types.is_bool_dtype(labels):
        values = labels.to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(values) & (values == np.round(values))):
            raise DataError(
                f"label column {column!r} of {path} has non-integer numbers; use integers or class names"
            )
        uniques, y = np.unique(values.astype(np.int64), return_inverse=True)
        class_names = [str(int(v)) for v in uniques]
    else:
        texts = labels.astype(str).str.strip().to_numpy(dtype=object)
        uniques, y = np.unique(texts, return_inverse=True)
        class_names = [str(v) for v in uniques]
    if len(class_names) < 2:
        raise DataError(
            f"label column {column!r} of {path} has only {len(class_names)} class(es); need at least 2"
        )
    return y.astype(np.int64).reshape(-1), class_names


def _load_csv(spec: DataSpec) -> Dataset:
    """Load a headed CSV: one label column, every other column a numeric feature."""
    assert spec.csv  # load_dataset validated the spec
    path = os.fspath(spec.csv)
    df = _read_csv(path, "CSV", header=0)
    # Header cells like "a, label" carry stray spaces that users never mean as part of the name.
    df.columns = [str(c).strip() for c in df.columns]
    label = str(spec.label_column)
    if label not in df.columns:
        raise DataError(
            f"label column {label!r} not found in {path}; available columns: {', '.join(df.columns)}"
        )
    feature_names = [c for c in df.columns if c != label]
    if not feature_names:
        raise DataError(f"{path} has no feature columns besides the label column {label!r}")
    x = _numeric_matrix(df[feature_names], path, [repr(c) for c in feature_names])
    y, class_names = _encode_labels(df[label], label, path)
    return Dataset(x=x, y=y, feature_names=feature_names, class_names=class_names)


def _load_breast_cancer() -> Dataset:
    """scikit-learn's bundled Wisconsin breast cancer data (ships with the package, no download)."""
    # Imported lazily so clients using their own CSVs do not pay for importing scikit-learn.
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    return Dataset(
        x=np.asarray(bunch.data, dtype=np.float64),
        y=np.asarray(bunch.target, dtype=np.int64),
        feature_names=[str(n) for n in bunch.feature_names],
        class_names=[str(n) for n in bunch.target_names],
    )


@functools.lru_cache(maxsize=2)  # a simulation's many clients in one process share one copy
def _load_synthetic(spec: DataSpec) -> Dataset:
    """A generated two-class problem of any size (scikit-learn's make_classification), for
    exercising the protocol with many clients; deterministic in the spec's seed."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=spec.rows, n_features=spec.features,
                               n_informative=max(2, min(spec.features // 2, 10)), n_redundant=0,
                               random_state=spec.seed)
    return Dataset(x=np.asarray(x, dtype=np.float64), y=np.asarray(y, dtype=np.int64),
                   feature_names=[f"f{i}" for i in range(spec.features)], class_names=["0", "1"])


def load_dataset(spec: DataSpec) -> Dataset:
    """Load every row of the spec's source, with the missing sentinel replaced by NaN."""
    spec.validate()
    if spec.source == "seed":
        ds = _load_seed(spec)
    elif spec.source == "csv":
        ds = _load_csv(spec)
    elif spec.source == "synthetic":
        ds = _load_synthetic(spec)
        if spec.missing_value is not None:  # never write into the shared cached copy
            ds = Dataset(ds.x.copy(), ds.y, ds.feature_names, ds.class_names)
    else:
        ds = _load_breast_cancer()
    if spec.missing_value is not None:
        ds.x[ds.x == spec.missing_value] = np.nan
    return ds


# ---------------------------------------------------------------- splitting and sharding


def _check_seed(seed: int) -> None:
    """Reject seeds numpy cannot use, as a DataError."""
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")


def split_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic (train_idx, test_idx), both sorted, disjoint and covering all rows."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"labels must be one-dimensional, got shape {y.shape}")
    if len(y) == 0:
        raise DataError("cannot split an empty dataset")
    if not _is_number(test_fraction) or not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    test_parts = []
    # Classes are visited in sorted order so the rng draws, hence the split, depend only on the inputs.
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        n = len(members)
        n_test = int(math.floor(n * float(test_fraction) + 0.5))
        if n >= 2:
            # Every class is evaluated, and every class keeps at least one row to learn from.
            n_test = min(max(n_test, 1), n - 1)
        else:
            n_test = 0
        test_parts.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    train_idx = np.flatnonzero(~is_test).astype(np.int64)
    return train_idx, test_idx


def shard_indices(train_idx: np.ndarray, num_shards: int, shard: int, seed: int) -> np.ndarray:
    """The sorted training rows of IID shard ``shard`` out of ``num_shards``."""
    if not _is_int(num_shards) or num_shards < 1:
        raise DataError(f"num_shards must be an integer >= 1, got {num_shards!r}")
    if not _is_int(shard) or not 0 <= shard < num_shards:
        raise DataError(
            f"shard {shard} is out of range for {num_shards} shards (0..{num_shards - 1})"
        )
    _check_seed(seed)
    train_idx = np.asarray(train_idx)
    if train_idx.ndim != 1:
        raise DataError(f"train indices must be one-dimensional, got shape {train_idx.shape}")
    n = len(train_idx)
    if n < num_shards:
        raise DataError(
            f"too many shards for {n} training rows ({num_shards} shards would leave some empty)"
        )
    # Sorting first makes the result independent of the order the caller passed the indices in;
    # the extra seed word gives a stream unrelated to the one split_indices drew from.
    base = np.sort(train_idx).astype(np.int64)
    rng = np.random.default_rng([seed, 1])
    parts = np.array_split(base[rng.permutation(n)], num_shards)
    return np.sort(parts[shard])


def load_test(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """The held-out test rows, which no shard contains: (x float64 with NaN, y int64)."""
    ds = load_dataset(spec)
    _, test_idx = split_indices(ds.y, spec.test_fraction, spec.seed)
    return ds.x[test_idx], ds.y[test_idx]


# ---------------------------------------------------------------- federated standardisation


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
        if not _is_int(rows) or rows < 0:
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
    if not all(_is_number(v) for v in value):
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
