"""The seed's hemodialysis CSVs, when this machine has them."""

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
