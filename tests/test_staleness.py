"""Buffered aggregation's math (fedq.learning.staleness) and the run spec's checks of it: fast, no Redis."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedq.errors import ConfigError
from fedq.learning.aggregate import fedavg
from fedq.learning.spec import RunSpec
from fedq.learning.staleness import Contribution, buffered_proposal, staleness_weight, version_accumulator
from fedq.learning.strategies import Strategy, StrategySpec

SHAPES = [(4, 3), (3,)]


def _model(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def test_staleness_weights() -> None:
    assert [staleness_weight("inverse-sqrt", t) for t in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    assert {staleness_weight("constant", t) for t in range(20)} == {1.0}
    hinge = [staleness_weight("hinge", t) for t in range(8)]
    assert hinge == [1.0] * 5 + [0.5, 1 / 3, 0.25]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="staleness must be"):
            staleness_weight("constant", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown staleness weight 'linear'"):
        staleness_weight("linear", 1)


def _contribution(updates: list[tuple[list[np.ndarray], int]], base: list[np.ndarray], tau: int) -> Contribution:
    """What the driver hands over for one base version: the accumulator's mean of its updates."""
    acc = version_accumulator(StrategySpec(), base)
    acc.begin_round(base)
    for i, (tensors, n) in enumerate(updates):
        acc.add(tensors, n, f"c{i}")
    return Contribution(acc.result(), base, acc.total_examples, tau)


def test_fresh_buffer_is_fedavg() -> None:
    """Every update trained from the current version: the proposal is FedAvg's weighted mean."""
    current = _model(0)
    updates = [(_model(s), n) for s, n in ((1, 10), (2, 30), (3, 60))]
    got = buffered_proposal(current, [_contribution(updates, current, 0)])
    for g, want in zip(got, fedavg(updates)):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


def test_stale_deltas_are_taken_from_their_own_base_and_down_weighted() -> None:
    old, current = _model(0), _model(1)
    fresh, stale = _model(2), _model(3)
    got = buffered_proposal(current, [_contribution([(fresh, 20)], current, 0), _contribution([(stale, 20)], old, 3)])
    for i, c in enumerate(current):
        # current + (1 * 20 (fresh - current) + 0.5 * 20 (stale - old)) / 40
        want = c + (20 * (fresh[i] - c) + 0.5 * 20 * (stale[i] - old[i])) / 40
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
    constant = buffered_proposal(current, [_contribution([(stale, 20)], old, 3)], weight="constant")
    for i, c in enumerate(current):  # s = 1: the stale delta applied whole to the current model
        np.testing.assert_allclose(constant[i], c + stale[i] - old[i], rtol=1e-5, atol=1e-6)


def test_clipping_is_against_the_update_s_own_base() -> None:
    base = _model(0)
    far = [b + 10.0 for b in base]
    acc = version_accumulator(StrategySpec(clip_norm=1.0), base)
    acc.begin_round(base)
    acc.add(far, 5, "c0")
    delta = np.concatenate([(m - b).ravel() for m, b in zip(acc.result(), base)])
    assert math.isclose(float(np.linalg.norm(delta)), 1.0, rel_tol=1e-4)


def test_server_step_applies_to_the_buffered_proposal() -> None:
    current, proposal = _model(0), _model(1)
    s = Strategy(StrategySpec(name="fedavgm", server_lr=1.0, momentum=0.5), current)
    first = s.step(current, proposal)
    for f, c, p in zip(first, current, proposal):
        np.testing.assert_allclose(f, p, rtol=1e-5, atol=1e-6)  # v = delta, x + v
        assert f.dtype == c.dtype
    second = s.step(first, proposal)
    for sec, f, c, p in zip(second, first, current, proposal):  # v = 0.5 (p - c) + (p - f)
        np.testing.assert_allclose(sec, f + 0.5 * (p - c) + (p - f), rtol=1e-4, atol=1e-5)


def test_empty_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="empty buffer"):
        buffered_proposal(_model(0), [])


@pytest.mark.parametrize(("fields", "message"), [
    ({"aggregation": "eventual"}, "unknown aggregation 'eventual'"),
    ({"buffer_size": 2}, "buffer size needs --aggregation buffered"),
    ({"aggregation": "buffered", "buffer_size": 6}, "buffer size must be between 1 and the clients (5)"),
    ({"aggregation": "buffered", "max_staleness": -1}, "max staleness must be between 0 and 1000"),
    ({"aggregation": "buffered", "staleness_weight": "linear"}, "unknown staleness weight 'linear'"),
    ({"aggregation": "buffered", "strategy": StrategySpec(name="fedmedian")}, "fedmedian needs a coordinate-wise"),
    ({"aggregation": "buffered", "strategy": StrategySpec(name="trimmed-mean")}, "needs a trimmed mean"),
    ({"aggregation": "buffered", "strategy": StrategySpec(name="krum", byzantine=0)}, "needs Krum's scores"),
    ({"aggregation": "buffered", "dp": "central", "dp_clip": 1.0, "dp_noise": 0.5},
     "dp central cannot be used with --aggregation buffered: it calibrates its noise"),
    ({"aggregation": "buffered", "fraction_fit": 0.6}, "--fraction-fit cannot be used with --aggregation buffered"),
    ({"aggregation": "buffered", "max_client_share": 0.5}, "--max-client-share cannot be used"),
    ({"aggregation": "buffered", "min_clients": 3}, "--min-clients cannot be used"),
])
def test_spec_refuses_what_buffering_cannot_serve(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunSpec(clients=5, **fields).validate()
    assert message in str(err.value)


def test_spec_defaults_and_round_trip() -> None:
    spec = RunSpec(clients=5, aggregation="buffered", strategy=StrategySpec(name="fedadam")).validate()
    assert (spec.buffer_k, spec.staleness_limit, spec.staleness_kind) == (3, 10, "inverse-sqrt")
    assert RunSpec.from_dict(spec.to_dict()) == spec
    sync = RunSpec(clients=5).validate()
    assert not sync.buffered and sync.staleness_limit == 0  # a round's push window: the open round only
