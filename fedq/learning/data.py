"""Datasets: loading a spec's rows (``Dataset``), and the deterministic train/test split and
shards every client derives from the same ``DataSpec`` (no rows are exchanged). The spec itself is
fedq.learning.dataspec; the clients' feature statistics and the scaler, fedq.learning.scaling.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedq.errors import DataError
from fedq.learning.dataspec import DataSpec, is_int, is_number

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

SEED_CLASS_NAMES = ["normal", "abnormal"]
SEED_MISSING_VALUE = -1.0


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


# The Wisconsin data's ten measurements, each as a mean, a standard error and a worst value.
_WISCONSIN = ("radius", "texture", "perimeter", "area", "smoothness", "compactness", "concavity",
              "concave points", "symmetry", "fractal dimension")
BREAST_CANCER_FEATURES = ([f"mean {m}" for m in _WISCONSIN] + [f"{m} error" for m in _WISCONSIN]
                          + [f"worst {m}" for m in _WISCONSIN])


def _breast_cancer_csv() -> Path | None:
    """The CSV file scikit-learn ships the data in, found without importing scikit-learn (whose
    import costs a second or more of CPU, pandas and scipy included); None when it is not there."""
    try:
        found = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    for root in (found.submodule_search_locations or []) if found else []:
        path = Path(root) / "datasets" / "data" / "breast_cancer.csv"
        if path.is_file():
            return path
    return None


def _load_breast_cancer() -> Dataset:
    """scikit-learn's bundled Wisconsin breast cancer data (ships with the package, no download),
    read from its CSV: a line "rows,features,class names...", then the rows, label last."""
    path = _breast_cancer_csv()
    if path is None:  # laid out otherwise: let scikit-learn read it
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        return Dataset(x=np.asarray(bunch.data, dtype=np.float64), y=np.asarray(bunch.target, dtype=np.int64),
                       feature_names=[str(n) for n in bunch.feature_names],
                       class_names=[str(n) for n in bunch.target_names])
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        head = next(reader)
        rows = [row for row in reader if row]
    table = np.asarray(rows, dtype=np.float64)
    if table.shape != (int(head[0]), int(head[1]) + 1) or len(BREAST_CANCER_FEATURES) != int(head[1]):
        raise DataError(f"{path}: {table.shape} values where its first line announces {head[:2]}")
    return Dataset(x=np.ascontiguousarray(table[:, :-1]), y=table[:, -1].astype(np.int64),
                   feature_names=list(BREAST_CANCER_FEATURES), class_names=[str(n) for n in head[2:]])


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
    if not is_int(seed) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")


def split_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic (train_idx, test_idx), both sorted, disjoint and covering all rows."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"labels must be one-dimensional, got shape {y.shape}")
    if len(y) == 0:
        raise DataError("cannot split an empty dataset")
    if not is_number(test_fraction) or not 0.0 < float(test_fraction) < 1.0:
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
    if not is_int(num_shards) or num_shards < 1:
        raise DataError(f"num_shards must be an integer >= 1, got {num_shards!r}")
    if not is_int(shard) or not 0 <= shard < num_shards:
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
