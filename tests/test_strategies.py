"""fedq.learning.strategies against plain numpy references: combiners, server optimisers, clipping,
server-state round trips, sampling, spec checks, and the streaming memory bound."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import weakref

import numpy as np
import pytest
from scipy import stats

from fedq.errors import CodecError, ConfigError
from fedq.learning.aggregate import fedavg
from fedq.learning.strategies import (
    STRATEGIES,
    Strategy,
    StrategySpec,
    aggregate_all,
    clip_update,
    held_bytes,
    sample_size,
    select_clients,
)
from fedq.learning.strategies.robust import Krum

SHAPES = [(4, 3), (3,), (2, 2, 2)]


def _model(rng: np.random.Generator, scale: float = 1.0) -> list[np.ndarray]:
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in SHAPES]


def _updates(seed: int, n: int) -> list[tuple[list[np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    return [(_model(rng), int(rng.integers(1, 500))) for _ in range(n)]


def _spec(name: str, **kw: object) -> StrategySpec:
    return StrategySpec(name=name, **kw)


def _close(got: list[np.ndarray], want: list[np.ndarray], tol: float = 1e-6) -> None:
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


# ---------------------------------------------------------------- combiners


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_family_is_exact_weighted_mean(name: str) -> None:
    ups = _updates(1, 7)
    glob = _model(np.random.default_rng(9))
    got = aggregate_all(_spec(name), ups, glob)
    _close(got, fedavg(ups))
    assert all(g.dtype == np.float32 for g in got)


def test_median_is_coordinatewise_and_ignores_sample_counts() -> None:
    ups = _updates(2, 6)
    got = aggregate_all(_spec("fedmedian"), ups, ups[0][0])
    want = [np.median(np.stack([u[0][i] for u in ups]).astype(np.float64), axis=0) for i in range(len(SHAPES))]
    _close(got, want)
    # Claiming a huge sample count buys nothing: each client counts once.
    heavy = [(t, n * (10**6 if k == 0 else 1)) for k, (t, n) in enumerate(ups)]
    _close(aggregate_all(_spec("fedmedian"), heavy, ups[0][0]), want)


@pytest.mark.parametrize("beta", [0.1, 0.2, 0.34, 0.45])
def test_trimmed_mean_matches_scipy(beta: float) -> None:
    ups = _updates(3, 9)
    got = aggregate_all(_spec("trimmed-mean", trim_fraction=beta), ups, ups[0][0])
    want = [stats.trim_mean(np.stack([u[0][i] for u in ups]).astype(np.float64), beta, axis=0)
            for i in range(len(SHAPES))]
    _close(got, want)


def _krum_reference(models: list[list[np.ndarray]], f: int) -> list[float]:
    flat = [np.concatenate([t.astype(np.float64).ravel() for t in m]) for m in models]
    n = len(flat)
    k = min(max(n - f - 2, 1), n - 1)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:k]))
    return scores


def test_krum_scores_and_choice_match_the_definition() -> None:
    rng = np.random.default_rng(4)
    honest = [_model(rng, 0.1) for _ in range(6)]
    outlier = [t + 5 for t in _model(rng)]
    models = honest[:3] + [outlier] + honest[3:]
    ups = [(m, 10 * (i + 1)) for i, m in enumerate(models)]
    k = Krum(models[0], byzantine=1, keep=1)
    for i, (m, n) in enumerate(ups):
        k.add(m, n, f"c{i}")
    np.testing.assert_allclose(k.scores(k.distances()), _krum_reference(models, 1), rtol=1e-9)
    got = k.result()
    best = int(np.argmin(_krum_reference(models, 1)))
    _close(got, models[best])
    assert k.info()["selected"] == [f"c{best}"] and "c3" not in k.info()["selected"]


def test_multi_krum_averages_the_m_best_weighted_and_drops_the_outlier() -> None:
    rng = np.random.default_rng(5)
    models = [_model(rng, 0.1) for _ in range(6)] + [[t - 50 for t in _model(rng)]]
    ups = [(m, i + 1) for i, m in enumerate(models)]
    s = Strategy(_spec("multi-krum", byzantine=1), models[0])
    s.begin_round(models[0])
    for i, (m, n) in enumerate(ups):
        s.add(m, n, f"c{i}")
    got = s.result()
    chosen = s.round_info()["selected"]
    assert len(chosen) == 6 and "c6" not in chosen  # m = n - f
    _close(got, fedavg([ups[int(c[1:])] for c in chosen]))
    two = Strategy(_spec("multi-krum", byzantine=1, krum_keep=2), models[0])
    two.begin_round(models[0])
    for i, (m, n) in enumerate(ups):
        two.add(m, n, f"c{i}")
    two.result()
    assert len(two.round_info()["selected"]) == 2


def test_krum_with_fewer_updates_than_planned_still_chooses() -> None:
    ups = _updates(6, 2)  # a round that closed at its quorum with 2 of 5
    got = aggregate_all(_spec("krum", byzantine=1), ups, ups[0][0])
    assert any(all(np.array_equal(g, t) for g, t in zip(got, u[0])) for u in ups)


# ---------------------------------------------------------------- server optimisers


def test_fedavgm_without_momentum_and_unit_rate_is_fedavg() -> None:
    spec = _spec("fedavgm", server_lr=1.0, momentum=0.0)
    glob = _model(np.random.default_rng(7))
    ups = _updates(8, 4)
    _close(aggregate_all(spec, ups, glob), fedavg(ups))


def _two_rounds(spec: StrategySpec) -> tuple[list[list[np.ndarray]], list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(11)
    x0 = _model(rng)
    rounds = [_updates(20 + r, 3) for r in range(2)]
    s = Strategy(spec, x0)
    xs, x = [], x0
    for ups in rounds:
        x = aggregate_all(spec, ups, x, strategy=s)
        xs.append(x)
    return xs, x0, [fedavg(ups) for ups in rounds]


def test_fedavgm_matches_hand_computed_momentum() -> None:
    lr, beta = 0.5, 0.9
    xs, x0, avgs = _two_rounds(_spec("fedavgm", server_lr=lr, momentum=beta))
    x, v = [t.astype(np.float64) for t in x0], [np.zeros(t.shape) for t in x0]
    for avg, got in zip(avgs, xs):
        d = [a.astype(np.float64) - xi for a, xi in zip(avg, x)]
        v = [beta * vi + di for vi, di in zip(v, d)]
        x = [xi + lr * vi for xi, vi in zip(x, v)]
        _close(got, x, 1e-5)


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_optimisers_match_the_paper(kind: str) -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    xs, x0, avgs = _two_rounds(_spec(kind, server_lr=lr, beta1=b1, beta2=b2, tau=tau))
    x = [t.astype(np.float64) for t in x0]
    m = [np.zeros(t.shape) for t in x0]
    v = [np.full(t.shape, tau ** 2) for t in x0]
    for avg, got in zip(avgs, xs):
        d = [a.astype(np.float64) - xi for a, xi in zip(avg, x)]
        m = [b1 * mi + (1 - b1) * di for mi, di in zip(m, d)]
        if kind == "fedadam":
            v = [b2 * vi + (1 - b2) * di ** 2 for vi, di in zip(v, d)]
        elif kind == "fedyogi":
            v = [vi - (1 - b2) * di ** 2 * np.sign(vi - di ** 2) for vi, di in zip(v, d)]
        else:
            v = [vi + di ** 2 for vi, di in zip(v, d)]
        x = [xi + lr * mi / (np.sqrt(vi) + tau) for xi, mi, vi in zip(x, m, v)]
        _close(got, x, 1e-4)


def test_integer_tensors_are_never_optimised() -> None:
    glob = [np.zeros((3,), np.float32), np.array([5, 6], np.int64)]
    ups = [([np.ones(3, np.float32), np.array([7, 8], np.int64)], 1)]
    got = aggregate_all(_spec("fedadam"), ups, glob)
    assert got[1].dtype == np.int64 and got[1].tolist() == [7, 8]


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_state_round_trip_continues_bit_for_bit(name: str) -> None:
    """A driver that takes over after round 2 continues exactly as one that never stopped."""
    rng = np.random.default_rng(30)
    x0 = _model(rng)
    rounds = [_updates(40 + r, 3) for r in range(4)]
    spec = _spec(name)
    a = Strategy(spec, x0)
    x, saved, at2 = x0, None, None
    for r, ups in enumerate(rounds, start=1):
        x = aggregate_all(spec, ups, x, strategy=a)
        if r == 2:
            saved, at2 = a.state_bytes(2), x
    b = Strategy(spec, x0)
    b.load_state(saved, 2)
    y = at2
    for ups in rounds[2:]:
        y = aggregate_all(spec, ups, y, strategy=b)
    for got, want in zip(y, x):
        assert np.array_equal(got, want)


def test_state_that_does_not_fit_is_refused() -> None:
    x0 = _model(np.random.default_rng(1))
    adam = Strategy(_spec("fedadam"), x0)
    aggregate_all(adam.spec, _updates(2, 2), x0, strategy=adam)
    raw = adam.state_bytes(1)
    with pytest.raises(CodecError, match="after round 1"):
        Strategy(_spec("fedadam"), x0).load_state(raw, 2)
    with pytest.raises(CodecError, match="fedadam"):
        Strategy(_spec("fedyogi"), x0).load_state(raw, 1)
    with pytest.raises(CodecError, match="no saved server state"):
        Strategy(_spec("fedadam"), x0).load_state(None, 3)
    with pytest.raises(CodecError, match="does not fit"):
        Strategy(_spec("fedadam"), [np.zeros((5,), np.float32)]).load_state(raw, 1)
    with pytest.raises(CodecError):
        Strategy(_spec("fedadam"), x0).load_state(b"garbage", 1)
    assert Strategy(_spec("fedavg"), x0).state_bytes(1) is None
    Strategy(_spec("fedadam"), x0).load_state(None, 0)  # a fresh run has none yet


# ---------------------------------------------------------------- clipping


def test_clipping_bounds_every_update_and_leaves_small_ones_alone() -> None:
    rng = np.random.default_rng(50)
    glob = _model(rng)
    small = [g + 0.001 for g in glob]
    big = [g + 10.0 for g in glob]
    out, norm, clipped = clip_update(big, glob, 1.0)
    assert clipped and norm > 1.0
    delta = np.sqrt(sum(np.sum((o.astype(np.float64) - g) ** 2) for o, g in zip(out, glob)))
    assert delta == pytest.approx(1.0, rel=1e-5)
    out, _, clipped = clip_update(small, glob, 1.0)
    assert not clipped and all(np.array_equal(o, s) for o, s in zip(out, small))
    s = Strategy(_spec("fedmedian", clip_norm=1.0), glob)
    s.begin_round(glob)
    s.add(big, 5, "attacker")
    s.add(small, 5, "honest")
    s.result()
    info = s.round_info()
    assert info["clipped"] == ["attacker"] and set(info["update_norms"]) == {"attacker", "honest"}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_runs_with_clipping(name: str) -> None:
    ups = _updates(60, 5)
    glob = _model(np.random.default_rng(61))
    got = aggregate_all(_spec(name, clip_norm=0.5), ups, glob)
    assert all(np.isfinite(g).all() for g in got)


# ---------------------------------------------------------------- memory


def test_streaming_strategies_keep_one_model_robust_ones_hold_n() -> None:
    rng = np.random.default_rng(70)
    glob = _model(rng)
    for name in STRATEGIES:
        assert Strategy(_spec(name), glob).holds_all == (name in ("fedmedian", "trimmed-mean", "krum", "multi-krum"))
    s = Strategy(_spec("fedadam", clip_norm=1.0), glob)
    s.begin_round(glob)
    refs = []
    for i in range(30):
        model = _model(rng)
        refs.extend(weakref.ref(t) for t in model)
        s.add(model, i + 1, f"c{i}")
        del model
    gc.collect()
    assert not [r for r in refs if r() is not None], "a streaming strategy kept an added update"
    assert held_bytes(glob, 10) == 10 * sum(t.nbytes for t in glob)


def test_reset_forgets_the_round_and_result_needs_a_round() -> None:
    glob = _model(np.random.default_rng(80))
    s = Strategy(_spec("trimmed-mean"), glob)
    with pytest.raises(ValueError):
        s.add(glob, 1)
    s.begin_round(glob)
    s.add(glob, 3, "a")
    s.reset()
    assert s.count == 0 and s.total_examples == 0
    with pytest.raises(ValueError):
        s.result()


# ---------------------------------------------------------------- spec


def test_spec_defaults_checks_and_round_trip() -> None:
    assert StrategySpec().resolved() == StrategySpec()
    adam = StrategySpec(name="fedadam").resolved()
    assert adam.server_lr and adam.tau and adam.beta1 == 0.9
    assert StrategySpec(name="fedprox").proximal_mu > 0 and StrategySpec().proximal_mu == 0
    assert StrategySpec(name="fedavg", mu=0.5).proximal_mu == 0.5
    spec = StrategySpec(name="krum", byzantine=2, krum_keep=3, clip_norm=2.0)
    assert StrategySpec.from_dict(spec.to_dict()) == spec
    bad = [(dict(name="nope"), "unknown strategy"), (dict(server_lr=-1.0), "server lr"),
           (dict(momentum=1.0), "momentum"), (dict(trim_fraction=0.5), "trim fraction"),
           (dict(name="krum", byzantine=2), "n > 2f \\+ 2"), (dict(krum_keep=9), "krum keep"),
           (dict(mu=-0.1), "mu"), (dict(clip_norm=0.0), "clip norm")]
    for kw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            dataclasses.replace(StrategySpec(), **kw).validate(expected_clients=5)
    with pytest.raises(ConfigError, match="unknown fields"):
        StrategySpec.from_dict({"name": "fedavg", "lr": 1})


# ---------------------------------------------------------------- client sampling


def test_sampling_is_deterministic_sized_and_varies_by_round() -> None:
    ids = [f"client-{k}" for k in range(10)]
    assert sample_size(10, 1.0) == 10 and sample_size(10, 0.3) == 3 and sample_size(5, 0.6) == 3
    assert sample_size(10, 0.01) == 1 and sample_size(0, 0.5) == 0
    a = select_clients(ids, 0.3, seed=7, round_no=4)
    assert a == select_clients(list(reversed(ids)), 0.3, seed=7, round_no=4) == sorted(a) and len(a) == 3
    assert set(a) <= set(ids)
    rounds = {tuple(select_clients(ids, 0.3, 7, r)) for r in range(1, 30)}
    assert len(rounds) > 10, "the choice should change from round to round"
    assert select_clients(ids, 0.3, 8, 4) != a or select_clients(ids, 0.3, 9, 4) != a
    assert select_clients(ids, 1.0, 7, 4) == ids
    seen = set(itertools.chain.from_iterable(select_clients(ids, 0.2, 1, r) for r in range(1, 60)))
    assert seen == set(ids)
