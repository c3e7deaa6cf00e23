"""The seed's hemodialysis CSVs, when this machine has them; iris as a CSV; an earlier run's outputs."""

from __future__ import annotations

import os
from pathlib import Path

from support.procs import ROOT

SEED_DATA_ENV = "FEDQ_SEED_DATA_DIR"
SEED_DATA_MISSING = (f"the seed's hemodialysis CSVs are not available: set {SEED_DATA_ENV} to the directory "
                     "that holds normal.csv and abnormal.csv (default: ../shared/data/hemodialysis beside "
                     "the repository)")


def seed_data_dir() -> Path | None:
    """FEDQ_SEED_DATA_DIR when set (only there), else shared/ beside the repository."""
    env = os.environ.get(SEED_DATA_ENV)
    candidates = [Path(env)] if env else [ROOT.parent / "shared" / "data" / "hemodialysis"]
    for c in candidates:
        if (c / "normal.csv").exists() and (c / "abnormal.csv").exists():
            return c
    return None


def iris_csv(path: Path) -> Path:
    """sklearn's iris (150 rows, 4 features, 3 species) as a headed CSV with a 'species' column:
    data too narrow for the seed network, which the built-in mlp trains on."""
    from sklearn.datasets import load_iris

    iris = load_iris()
    lines = ["sepal_length,sepal_width,petal_length,petal_width,species"]
    lines += [",".join(f"{v:g}" for v in row) + f",{iris.target_names[t]}" for row, t in zip(iris.data, iris.target)]
    path.write_text("\n".join(lines) + "\n")
    return path


def stale_outputs(out: Path) -> None:
    """A previous run's files in out (each says so, and none is a model)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.keras", "scaler.json", "curves.png", "report.json"):
        (out / name).write_text("from an earlier run")
