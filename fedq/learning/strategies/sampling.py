"""Client sampling: which of a run's clients train in a round (pure; deterministic by seed)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

_STREAM = 0x5E1EC7  # a fixed word so that this stream is unrelated to the data split's


def sample_size(num_clients: int, fraction: float) -> int:
    """How many of num_clients train in a round: ceil(fraction x clients), at least 1."""
    if num_clients <= 0:
        return 0
    if fraction >= 1.0:
        return num_clients
    # The small tolerance keeps e.g. 0.6 x 5 = 3.0000000000000004 at 3, not 4.
    return min(num_clients, max(1, math.ceil(fraction * num_clients - 1e-9)))


def select_clients(client_ids: Iterable[str], fraction: float, seed: int, round_no: int) -> list[str]:
    """The sorted ids chosen for round_no: a function of (seed, round, the sorted ids) only."""
    ids = sorted(set(client_ids))
    k = sample_size(len(ids), fraction)
    if k >= len(ids):
        return ids
    rng = np.random.default_rng([int(seed), _STREAM, int(round_no)])
    picked = rng.choice(len(ids), size=k, replace=False)
    return sorted(ids[i] for i in picked)
