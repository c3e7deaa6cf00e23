"""Buffered asynchronous aggregation's math (FedBuff): staleness weights and the buffer's step.

Pure numpy, free of Redis and Keras (fedq.roles.buffered drives it). Nguyen et al., "Federated
Learning with Buffered Asynchronous Aggregation" (AISTATS 2022): clients train from whatever
model version is newest when they start; the server folds each update as it arrives and moves
to version v+1 after K of them. An update trained from version b and folded while the server is
at version v has staleness tau = v - b, and its delta (model - version b) is down-weighted by
s(tau). The next model (before the strategy's server step) is::

    proposal = current + sum_i s(tau_i) n_i (w_i - g_{b_i}) / sum_i n_i

with n_i the update's sample count. Without staleness (every tau 0, s(0) = 1) this is FedAvg's
weighted mean of the models; the denominator leaves s out, as the paper's 1/K does, so a buffer of
stale updates moves the model less, not just differently.

Updates trained from the same version all have the same staleness, so the buffer is kept as one
weighted mean per base version (a streaming sum each, memory one model per version in flight),
and combined here at commit time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedq.errors import ConfigError
from fedq.learning import choices
from fedq.learning.strategies import Strategy, StrategySpec

# --staleness-weight: s(tau) of an update tau versions old
WEIGHTS = choices.STALENESS_WEIGHTS
DEFAULT_WEIGHT = choices.DEFAULT_STALENESS_WEIGHT
HINGE_FREE = 4  # hinge: updates up to this many versions old keep full weight ...
HINGE_SLOPE = 1.0  # ... and older ones get 1 / (1 + slope x (tau - free))


def staleness_weight(kind: str, tau: int) -> float:
    """s(tau): inverse-sqrt 1/sqrt(1 + tau) (the paper's default), constant 1, or hinge
    (1 up to HINGE_FREE versions, then 1 / (1 + HINGE_SLOPE (tau - HINGE_FREE)))."""
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 0:
        raise ValueError(f"staleness must be a whole number 0 or more, got {tau!r}")
    if kind == "inverse-sqrt":
        return 1.0 / math.sqrt(1.0 + tau)
    if kind == "constant":
        return 1.0
    if kind == "hinge":
        return 1.0 if tau <= HINGE_FREE else 1.0 / (1.0 + HINGE_SLOPE * (tau - HINGE_FREE))
    raise ValueError(f"unknown staleness weight {kind!r}; choose one of {', '.join(WEIGHTS)}")


@dataclass(frozen=True)
class Contribution:
    """What one base version adds to the buffer: the weighted mean of its updates, the model
    they trained from, their total sample count, and their staleness."""

    mean: Sequence[np.ndarray]
    base: Sequence[np.ndarray]
    num_examples: int
    staleness: int


def buffered_proposal(current: Sequence[np.ndarray], contributions: Sequence[Contribution],
                      weight: str = DEFAULT_WEIGHT) -> list[np.ndarray]:
    """The next model before the server step: current plus the staleness-weighted mean delta
    (see the module's formula). Integer tensors (counters) take the freshest mean's values."""
    if not contributions:
        raise ValueError("an empty buffer has no next model")
    total = sum(c.num_examples for c in contributions)
    if total <= 0:
        raise ValueError("the buffer's sample counts must be positive")
    freshest = min(contributions, key=lambda c: c.staleness)
    out: list[np.ndarray] = []
    for i, cur in enumerate(current):
        cur = np.asarray(cur)
        if not np.issubdtype(cur.dtype, np.floating):
            out.append(np.asarray(freshest.mean[i]).astype(cur.dtype, copy=True))
            continue
        step = np.zeros(cur.shape, dtype=np.float64)
        for c in contributions:
            scale = staleness_weight(weight, c.staleness) * c.num_examples / total
            step += scale * (np.asarray(c.mean[i], dtype=np.float64) - np.asarray(c.base[i], dtype=np.float64))
        out.append((cur.astype(np.float64) + step).astype(cur.dtype))
    return out


def check_buffered(clients: int, buffer_size: int, max_staleness: int, weight: str) -> None:
    """ConfigError naming the first bad buffered-aggregation setting."""
    for name, value in (("buffer size", buffer_size), ("max staleness", max_staleness)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not 1 <= buffer_size <= clients:
        # A client adds one update per version it trained from: K above the clients never fills.
        raise ConfigError(f"buffer size must be between 1 and the clients ({clients}), got {buffer_size}")
    if not 0 <= max_staleness <= 1000:
        raise ConfigError(f"max staleness must be between 0 and 1000 versions, got {max_staleness}")
    if weight not in WEIGHTS:
        raise ConfigError(f"unknown staleness weight {weight!r}; choose one of {', '.join(WEIGHTS)}")


def version_accumulator(run: StrategySpec, template: Sequence[np.ndarray]) -> Strategy:
    """The streaming weighted mean of the updates trained from one version (clipped against that
    version first when the run clips): what each base version adds to the buffer."""
    return Strategy(StrategySpec(name="fedavg", clip_norm=run.clip_norm), template)
