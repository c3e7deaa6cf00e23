"""Where a run's data comes from and how it is split (``DataSpec``): part of the run spec, stored
in Redis, checked without loading anything (no numpy: the CLI builds one before any data is read).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedq.errors import DataError

SOURCES = ("breast_cancer", "seed", "csv", "synthetic")
PARTITIONS = ("iid", "dirichlet", "by-label")  # implemented in fedq.learning.partition
SEED_MISSING_VALUE = -1.0


def is_int(value: Any) -> bool:
    """True for a real integer (bool excluded, since True/False are almost always a mistake here).
    A numpy scalar counts; numpy is not imported for the check (without it, none can exist)."""
    if isinstance(value, bool):
        return False
    np = sys.modules.get("numpy")
    return isinstance(value, int) or (np is not None and isinstance(value, np.integer))


def is_number(value: Any) -> bool:
    """True for an int or float that is not a bool (numpy scalars included, as in is_int)."""
    np = sys.modules.get("numpy")
    return is_int(value) or isinstance(value, float) or (np is not None and isinstance(value, np.floating))


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
                if not is_number(kw[name]):
                    raise DataError(f"data spec {name} must be a number, got {kw[name]!r}")
                kw[name] = float(kw[name])
        for name in ("test_fraction", "alpha", "val_fraction"):
            if name in kw and kw[name] is None:
                raise DataError(f"data spec {name} must be a number, got None")
        if "partition" in kw and kw["partition"] is None:
            raise DataError("data spec partition must be a string, got None")
        for name in ("rows", "features"):
            if name in kw and not is_int(kw[name]):
                raise DataError(f"data spec {name} must be an integer, got {kw[name]!r}")
        if "seed" in kw:
            seed = kw["seed"]
            if is_number(seed) and float(seed).is_integer():
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
        if not is_number(self.test_fraction) or not 0.0 < float(self.test_fraction) < 1.0:
            raise DataError(f"test_fraction must be strictly between 0 and 1, got {self.test_fraction!r}")
        if not is_int(self.seed) or self.seed < 0:
            # numpy's seeding rejects negative ints, so catch it here with a clearer message.
            raise DataError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.missing_value is not None and (
            not is_number(self.missing_value) or not math.isfinite(self.missing_value)
        ):
            raise DataError(f"missing_value must be a finite number or None, got {self.missing_value!r}")
        if self.partition not in PARTITIONS:
            raise DataError(f"unknown partition {self.partition!r} (expected one of: {', '.join(PARTITIONS)})")
        if not is_number(self.alpha) or not math.isfinite(float(self.alpha)) or not float(self.alpha) > 0:
            raise DataError(f"alpha must be a positive number, got {self.alpha!r}")
        if not is_number(self.val_fraction) or not 0.0 <= float(self.val_fraction) < 1.0:
            raise DataError(f"val_fraction must be at least 0 and below 1, got {self.val_fraction!r}")


def seed_spec(normal_csv: str, abnormal_csv: str, **kw: Any) -> DataSpec:
    """A "seed" spec for a normal/abnormal CSV pair; missing_value defaults to -1.0."""
    if "source" in kw:
        raise DataError("seed_spec always uses source 'seed'; do not pass source")
    kw.setdefault("missing_value", SEED_MISSING_VALUE)
    return DataSpec(source="seed", normal_csv=normal_csv, abnormal_csv=abnormal_csv, **kw)
