"""Tests for fedq.learning.data: loading, splitting, sharding and federated feature statistics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.data import SEED_DATA_MISSING, seed_data_dir
from support.procs import ROOT

from fedq.errors import DataError
from fedq.learning.data import Dataset, load_dataset, load_test, shard_indices, split_indices
from fedq.learning.dataspec import DataSpec, seed_spec
from fedq.learning.partition import load_shard
from fedq.learning.scaling import FeatureStats, combine_stats, feature_stats, scaler_from_stats, standardize

NUM_COLS = 17


def _write_seed_csv(path: Path, rows: list[list[str]]) -> Path:
    """Write rows in the seed format: UTF-8 BOM, CRLF line ends, no header."""
    text = "".join(",".join(row) + "\r\n" for row in rows)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return path


def _synthetic_rows(n: int, rng: np.random.Generator, missing_col: int | None = None) -> list[list[str]]:
    """n rows of NUM_COLS numbers; every third row has -1 (missing) in missing_col."""
    rows = []
    for i in range(n):
        values = [f"{v:.3f}" for v in rng.normal(10.0, 2.0, NUM_COLS)]
        if missing_col is not None and i % 3 == 0:
            values[missing_col] = "-1"
        rows.append(values)
    return rows


@pytest.fixture()
def seed_files(tmp_path: Path) -> tuple[Path, Path]:
    """Synthetic normal (30 rows) / abnormal (20 rows) seed-format CSVs."""
    rng = np.random.default_rng(42)
    normal = _write_seed_csv(tmp_path / "normal.csv", _synthetic_rows(30, rng, missing_col=4))
    abnormal = _write_seed_csv(tmp_path / "abnormal.csv", _synthetic_rows(20, rng, missing_col=7))
    return normal, abnormal


@pytest.fixture()
def seed_data(seed_files: tuple[Path, Path]) -> tuple[DataSpec, Dataset]:
    """The synthetic seed spec and its loaded dataset."""
    spec = seed_spec(str(seed_files[0]), str(seed_files[1]), test_fraction=0.25, seed=7)
    return spec, load_dataset(spec)


# ---------------------------------------------------------------- DataSpec


def test_spec_round_trip_and_defaults() -> None:
    spec = DataSpec()
    assert spec.source == "breast_cancer"
    spec.validate()
    s = seed_spec("a.csv", "b.csv", seed=3)
    assert s.source == "seed" and s.missing_value == -1.0 and s.seed == 3
    assert seed_spec("a.csv", "b.csv", missing_value=-9.0).missing_value == -9.0
    assert DataSpec.from_dict(s.to_dict()) == s
    # msgpack may turn floats that are whole numbers into ints.
    d = s.to_dict() | {"test_fraction": 0.5, "missing_value": -1}
    assert DataSpec.from_dict(d).missing_value == -1.0


def test_spec_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(DataError, match="bogus"):
        DataSpec.from_dict({"source": "seed", "bogus": 1})
    with pytest.raises(DataError, match="seed"):
        DataSpec.from_dict({"seed": "abc"})


@pytest.mark.parametrize(
    "spec, needle",
    [
        (DataSpec(source="parquet"), "parquet"),
        (DataSpec(source="seed", normal_csv="n.csv"), "abnormal_csv"),
        (DataSpec(source="seed", abnormal_csv="a.csv"), "normal_csv"),
        (DataSpec(source="csv", label_column="y"), "csv"),
        (DataSpec(source="csv", csv="d.csv"), "label_column"),
        (DataSpec(test_fraction=0.0), "test_fraction"),
        (DataSpec(test_fraction=1.0), "test_fraction"),
        (DataSpec(seed=-1), "seed"),
    ],
)
def test_spec_validate(spec: DataSpec, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        spec.validate()


# ---------------------------------------------------------------- seed source


def test_seed_files_load_with_classes_counts_and_nans(seed_data: tuple[DataSpec, Dataset]) -> None:
    _, ds = seed_data
    assert ds.x.shape == (50, NUM_COLS) and ds.x.dtype == np.float64
    assert ds.y.dtype == np.int64
    assert list(ds.y[:30]) == [0] * 30 and list(ds.y[30:]) == [1] * 20
    assert ds.class_names == ["normal", "abnormal"]
    assert ds.feature_names == [f"f{i}" for i in range(17)]
    assert ds.num_features == 17 and ds.num_classes == 2
    # -1 became NaN exactly where it was written (every third row of each file).
    assert np.isnan(ds.x[:30, 4]).sum() == 10 and np.isnan(ds.x[30:, 7]).sum() == 7
    assert np.isnan(ds.x).sum() == 17
    assert not (ds.x == -1).any()
    # The BOM did not leak into the first value.
    assert np.isfinite(ds.x[1, 0])


def test_seed_without_sentinel_keeps_minus_one(seed_files: tuple[Path, Path]) -> None:
    spec = seed_spec(str(seed_files[0]), str(seed_files[1]), missing_value=None)
    ds = load_dataset(spec)
    assert (ds.x == -1).sum() == 17 and not np.isnan(ds.x).any()


def test_seed_empty_cells_are_missing(tmp_path: Path) -> None:
    rows = [["1"] * NUM_COLS for _ in range(4)]
    rows[2][5] = ""
    normal = _write_seed_csv(tmp_path / "n.csv", rows)
    abnormal = _write_seed_csv(tmp_path / "a.csv", [["2"] * NUM_COLS] * 3)
    ds = load_dataset(seed_spec(str(normal), str(abnormal)))
    assert np.isnan(ds.x[2, 5]) and np.isnan(ds.x).sum() == 1


def test_seed_column_count_mismatch(tmp_path: Path) -> None:
    normal = _write_seed_csv(tmp_path / "n.csv", [["1"] * 17] * 3)
    abnormal = _write_seed_csv(tmp_path / "a.csv", [["1"] * 16] * 3)
    with pytest.raises(DataError, match=r"17.*16"):
        load_dataset(seed_spec(str(normal), str(abnormal)))


def test_seed_missing_file(tmp_path: Path, seed_files: tuple[Path, Path]) -> None:
    gone = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=f"normal CSV not found: {gone}"):
        load_dataset(seed_spec(str(gone), str(seed_files[1])))
    with pytest.raises(DataError, match=f"abnormal CSV not found: {gone}"):
        load_dataset(seed_spec(str(seed_files[0]), str(gone)))


def test_seed_empty_file(tmp_path: Path, seed_files: tuple[Path, Path]) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(DataError, match="empty"):
        load_dataset(seed_spec(str(empty), str(seed_files[1])))


def test_seed_non_numeric_cell(tmp_path: Path, seed_files: tuple[Path, Path]) -> None:
    rows = [["1"] * NUM_COLS for _ in range(4)]
    rows[3][9] = "oops"
    bad = _write_seed_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as info:
        load_dataset(seed_spec(str(seed_files[0]), str(bad)))
    message = str(info.value)
    assert str(bad) in message and "f9" in message and "oops" in message


# ---------------------------------------------------------------- csv source


def _write_csv(path: Path, text: str) -> Path:
    """Write a headed CSV with a BOM, as spreadsheet exports often have."""
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return path


def test_csv_string_labels(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "a,kind,b\n1,sick,2\n3,well,\n5,sick,-1\n7,ok,8\n")
    ds = load_dataset(DataSpec(source="csv", csv=str(path), label_column="kind", missing_value=-1))
    assert ds.feature_names == ["a", "b"]
    assert ds.class_names == ["ok", "sick", "well"]
    assert list(ds.y) == [1, 2, 1, 0] and ds.y.dtype == np.int64
    assert ds.x.dtype == np.float64 and np.isnan(ds.x[1, 1]) and np.isnan(ds.x[2, 1])
    assert ds.num_classes == 3


def test_csv_int_labels(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "x1,x2,label\r\n0.5,1,3\r\n1.5,2,1\r\n2.5,3,3\r\n")
    ds = load_dataset(DataSpec(source="csv", csv=str(path), label_column="label"))
    assert ds.class_names == ["1", "3"]
    assert list(ds.y) == [1, 0, 1]
    np.testing.assert_array_equal(ds.x, [[0.5, 1], [1.5, 2], [2.5, 3]])


def test_csv_unknown_label_column_lists_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "alpha,beta,gamma\n1,2,0\n3,4,1\n")
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(source="csv", csv=str(path), label_column="target"))
    message = str(info.value)
    assert "target" in message and "alpha, beta, gamma" in message


def test_csv_non_numeric_feature_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "age,city,y\n1,Oslo,0\n2,Rome,1\n")
    with pytest.raises(DataError, match="city"):
        load_dataset(DataSpec(source="csv", csv=str(path), label_column="y"))


def test_csv_label_problems(tmp_path: Path) -> None:
    missing = _write_csv(tmp_path / "m.csv", "a,y\n1,0\n2,\n3,1\n")
    with pytest.raises(DataError, match="no label"):
        load_dataset(DataSpec(source="csv", csv=str(missing), label_column="y"))
    single = _write_csv(tmp_path / "s.csv", "a,y\n1,0\n2,0\n")
    with pytest.raises(DataError, match="at least 2"):
        load_dataset(DataSpec(source="csv", csv=str(single), label_column="y"))
    with pytest.raises(DataError, match="CSV not found"):
        load_dataset(DataSpec(source="csv", csv=str(tmp_path / "x.csv"), label_column="y"))


# ---------------------------------------------------------------- breast cancer


def test_breast_cancer_loads() -> None:
    ds = load_dataset(DataSpec())
    assert ds.x.shape == (569, 30) and ds.x.dtype == np.float64
    assert ds.y.shape == (569,) and ds.y.dtype == np.int64
    assert ds.num_classes == 2 and ds.class_names == ["malignant", "benign"]
    assert len(ds.feature_names) == 30 and set(np.unique(ds.y)) == {0, 1}


# ---------------------------------------------------------------- split and shards


def test_split_is_stratified_deterministic_disjoint_and_covering() -> None:
    y = np.array([0] * 60 + [1] * 30 + [2] * 10 + [3] * 2 + [4])
    train, test = split_indices(y, 0.2, seed=5)
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(len(y)))
    counts = {c: int((y[test] == c).sum()) for c in range(5)}
    assert counts == {0: 12, 1: 6, 2: 2, 3: 1, 4: 0}
    again = split_indices(y, 0.2, seed=5)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], test)
    other = split_indices(y, 0.2, seed=6)
    assert not np.array_equal(other[1], test)


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(DataError):
        split_indices(np.array([0, 1]), 1.5, 0)
    with pytest.raises(DataError):
        split_indices(np.array([], dtype=np.int64), 0.2, 0)


def test_shards_disjoint_cover_train_deterministic() -> None:
    y = np.array([0] * 70 + [1] * 33)
    train, test = split_indices(y, 0.2, seed=1)
    shards = [shard_indices(train, 4, k, seed=1) for k in range(4)]
    joined = np.concatenate(shards)
    assert len(joined) == len(np.unique(joined)) == len(train)
    np.testing.assert_array_equal(np.sort(joined), train)
    assert all(len(np.intersect1d(s, test)) == 0 for s in shards)
    assert all(np.all(np.diff(s) > 0) for s in shards)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for k in range(4):
        np.testing.assert_array_equal(shard_indices(train, 4, k, seed=1), shards[k])
    # The input order does not matter, only the set of training rows.
    np.testing.assert_array_equal(shard_indices(train[::-1], 4, 2, seed=1), shards[2])


@pytest.mark.parametrize("shard, num_shards", [(3, 3), (-1, 3), (0, 0)])
def test_bad_shard_numbers(shard: int, num_shards: int) -> None:
    with pytest.raises(DataError):
        shard_indices(np.arange(10), num_shards, shard, seed=0)


def test_bad_shard_messages() -> None:
    with pytest.raises(DataError, match=r"shard 3 is out of range for 3 shards \(0\.\.2\)"):
        shard_indices(np.arange(10), 3, 3, seed=0)
    with pytest.raises(DataError, match="too many shards for 3 training rows"):
        shard_indices(np.arange(3), 4, 0, seed=0)


def test_load_shard_and_test_partition_the_rows(seed_data: tuple[DataSpec, Dataset]) -> None:
    spec, ds = seed_data
    x_test, y_test = load_test(spec)
    parts = [load_shard(spec, k, 3) for k in range(3)]
    assert sum(len(y) for _, y in parts) + len(y_test) == len(ds.y)
    assert (y_test == 0).sum() == 8 and (y_test == 1).sum() == 5  # 25% of 30 and of 20, rounded
    # Rows are distinct random values, so matching rows identifies where each one went.
    def keys(x: np.ndarray) -> set[bytes]:
        return {np.nan_to_num(r, nan=-1.0).tobytes() for r in x}

    test_keys = keys(x_test)
    shard_keys = [keys(x) for x, _ in parts]
    assert all(not (s & test_keys) for s in shard_keys)
    assert not (shard_keys[0] & shard_keys[1]) and not (shard_keys[1] & shard_keys[2])
    assert set().union(*shard_keys, test_keys) == keys(ds.x)
    for x, y in parts:
        assert x.dtype == np.float64 and y.dtype == np.int64 and len(x) == len(y)
    with pytest.raises(DataError, match="out of range"):
        load_shard(spec, 3, 3)


# ---------------------------------------------------------------- federated statistics


def _pooled_fixture() -> tuple[np.ndarray, np.ndarray]:
    """Random features with NaNs plus a split of them into a training set."""
    rng = np.random.default_rng(3)
    x = rng.normal(50.0, 7.0, size=(200, 6))
    x[:, 5] = 100.0  # constant column, as in the real seed data
    x[rng.random(x.shape) < 0.1] = np.nan
    y = (rng.random(200) < 0.3).astype(np.int64)
    train, _ = split_indices(y, 0.2, seed=0)
    return x, train


def test_combined_stats_equal_pooled_stats_and_nan_moments() -> None:
    x, train = _pooled_fixture()
    parts = [feature_stats(x[shard_indices(train, 5, k, seed=0)]) for k in range(5)]
    combined = combine_stats(parts)
    pooled = feature_stats(x[train])
    np.testing.assert_array_equal(combined.count, pooled.count)
    assert combined.count.dtype == np.int64 and combined.rows == pooled.rows == len(train)
    np.testing.assert_allclose(combined.total, pooled.total, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(combined.total_sq, pooled.total_sq, rtol=1e-9, atol=1e-9)
    mean, std = scaler_from_stats(combined)
    assert mean.dtype == np.float64 and std.dtype == np.float64
    np.testing.assert_allclose(mean, np.nanmean(x[train], axis=0), rtol=1e-9)
    np.testing.assert_allclose(std[:5], np.nanstd(x[train], axis=0)[:5], rtol=1e-7)
    assert std[5] == 1.0  # zero variance (despite rounding in the sums) falls back to 1


def test_scaler_edge_cases() -> None:
    x = np.array([[np.nan, 2.0, 1.0], [np.nan, 2.0, 3.0]])
    mean, std = scaler_from_stats(feature_stats(x))
    np.testing.assert_array_equal(mean, [0.0, 2.0, 2.0])
    np.testing.assert_array_equal(std, [1.0, 1.0, 1.0])


def test_combine_stats_rejects_mismatch() -> None:
    with pytest.raises(DataError, match="feature count mismatch"):
        combine_stats([feature_stats(np.zeros((2, 3))), feature_stats(np.zeros((2, 4)))])
    with pytest.raises(DataError):
        combine_stats([])


def test_standardize_imputes_nan_as_zero() -> None:
    x = np.array([[1.0, np.nan], [3.0, 10.0]])
    z = standardize(x, np.array([2.0, 5.0]), np.array([1.0, 2.5]))
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z, np.array([[-1.0, 0.0], [1.0, 2.0]], dtype=np.float32))
    with pytest.raises(DataError):
        standardize(x, np.zeros(3), np.ones(3))


def test_feature_stats_round_trip() -> None:
    stats = feature_stats(np.array([[1.0, np.nan], [2.0, 4.0], [np.nan, 5.0]]))
    d = stats.to_dict()
    assert d == {"count": [2, 2], "total": [3.0, 9.0], "total_sq": [5.0, 41.0], "rows": 3}
    assert all(type(v) is int for v in d["count"]) and type(d["rows"]) is int
    assert all(type(v) is float for v in d["total"] + d["total_sq"])
    back = FeatureStats.from_dict(d)
    assert back.to_dict() == d and back.count.dtype == np.int64 and back.total.dtype == np.float64


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"count": [1]}, "length"),
        ({"count": [4, 1]}, "count"),
        ({"count": [-1, 1]}, "count"),
        ({"count": [1.5, 1]}, "integer"),
        ({"total": [float("nan"), 1.0]}, "finite"),
        ({"total_sq": [float("inf"), 1.0]}, "finite"),
        ({"rows": -2}, "rows"),
        ({"extra": 1}, "extra"),
    ],
)
def test_feature_stats_from_dict_validation(change: dict, needle: str) -> None:
    good = {"count": [2, 1], "total": [3.0, 1.0], "total_sq": [5.0, 1.0], "rows": 3}
    with pytest.raises(DataError, match=needle):
        FeatureStats.from_dict(good | change)
    with pytest.raises(DataError, match="rows"):
        FeatureStats.from_dict({k: v for k, v in good.items() if k != "rows"})


# ---------------------------------------------------------------- optional real data


@pytest.mark.skipif(seed_data_dir() is None, reason=SEED_DATA_MISSING)
def test_real_seed_data() -> None:
    root = seed_data_dir()
    spec = seed_spec(str(root / "normal.csv"), str(root / "abnormal.csv"))
    ds = load_dataset(spec)
    assert ds.num_features == 17
    assert (ds.y == 0).sum() == 1514 and (ds.y == 1).sum() == 812
    assert not (ds.x == -1).any() and np.isnan(ds.x).any()
    train, test = split_indices(ds.y, spec.test_fraction, spec.seed)
    mean, std = scaler_from_stats(feature_stats(ds.x[train]))
    z = standardize(ds.x[test], mean, std)
    assert np.all(np.isfinite(z)) and np.all(np.abs(z) < 1e3)


@pytest.mark.slow
def test_seed_data_skips_name_the_setting(tmp_path: Path) -> None:
    # With the setting pointing at a directory without the CSVs, the tests that need them skip
    # and say how to provide them.
    env = dict(os.environ, FEDQ_SEED_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_data.py::test_real_seed_data",
                           "tests/test_e2e.py::test_acceptance_hemodialysis"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert "2 skipped" in done.stdout and len(skips) == 2, done.stdout + done.stderr
    assert all("set FEDQ_SEED_DATA_DIR to the directory" in line for line in skips), skips


def test_breast_cancer_is_read_without_scikit_learn_and_equals_its_loader() -> None:
    # A fresh interpreter: reading the bundled data must not import scikit-learn (nor pandas, scipy).
    code = ("import sys; from fedq.learning.data import load_dataset; from fedq.learning.dataspec import DataSpec; "
            "ds = load_dataset(DataSpec()); print(ds.x.shape, sorted(m for m in ('sklearn', 'pandas', 'scipy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert out.strip() == "(569, 30) []"
    from sklearn.datasets import load_breast_cancer

    ours, theirs = load_dataset(DataSpec()), load_breast_cancer()
    assert ours.x.dtype == np.float64 and ours.y.dtype == np.int64 and ours.x.flags.c_contiguous
    assert np.array_equal(ours.x, theirs.data) and np.array_equal(ours.y, theirs.target)
    assert ours.feature_names == [str(n) for n in theirs.feature_names]
    assert ours.class_names == [str(n) for n in theirs.target_names]
