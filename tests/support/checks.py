"""Reading what fedq exposes: Prometheus text, and the statistics of noise."""

from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from scipy import stats

P = 0.999999  # the chi-square bounds below fail a correct implementation once in 500,000 runs


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics text as (name, sorted labels) -> value, via prometheus-client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float | None:
    return parsed.get((name, tuple(sorted(labels.items()))))


def flat(tensors: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in tensors])


def assert_std(draws: np.ndarray, std: float) -> None:
    """sum(x^2) / std^2 of n zero-mean normal draws is chi-square(n): both tails must hold."""
    n = draws.size
    q = float(np.sum(np.square(draws)) / std ** 2)
    lo, hi = stats.chi2.ppf(1 - P, n), stats.chi2.ppf(P, n)
    assert lo < q < hi, f"sample std {np.sqrt(np.mean(draws ** 2)):.5f}, configured {std:.5f} (n {n})"
    assert abs(draws.mean()) < 6 * std / np.sqrt(n)
