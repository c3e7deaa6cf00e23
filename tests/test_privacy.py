"""fedq.learning.privacy against statistics and against dp-accounting itself: the noise has the configured
scale, clipping bounds every client's effect, epsilon is what Google's accountant says, and bad DP
settings are refused with a clear reason. Pure numpy: no Redis, no TensorFlow."""

from __future__ import annotations

import dataclasses
import itertools

import dp_accounting
import numpy as np
import pytest
from support.checks import assert_std as _assert_std
from support.checks import flat as _flat

from fedq.errors import ConfigError
from fedq.learning import privacy
from fedq.learning.privacy import CentralDP, NoisyMean
from fedq.learning.spec import RunSpec
from fedq.learning.strategies import Strategy, StrategySpec

SHAPES = [(150, 100), (40,), (3, 3)]


def _zeros() -> list[np.ndarray]:
    return [np.zeros(s, dtype=np.float32) for s in SHAPES]


def _random(rng: np.random.Generator, scale: float = 1.0) -> list[np.ndarray]:
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in SHAPES]


# ------------------------------------------------------------------------- central noise


@pytest.mark.parametrize("clip, z, denominator", [(1.0, 1.0, 2), (0.5, 2.5, 7), (3.0, 0.3, 1)])
def test_central_noise_on_zero_updates_has_std_z_c_over_d(clip: float, z: float, denominator: int) -> None:
    glob = _random(np.random.default_rng(1))
    s = Strategy(StrategySpec(), glob, dp=CentralDP(clip, z, denominator))
    s.begin_round(glob, noise_rng=np.random.default_rng(7))
    for k in range(denominator):
        s.add([g.copy() for g in glob], 100 * (k + 1), f"c{k}")  # model = global: a zero update
    noise = _flat(s.result()) - _flat(glob)
    # float32 rounding of global + noise adds ~1e-8 relative error: far below the bound's width.
    _assert_std(noise, z * clip / denominator)
    assert CentralDP(clip, z, denominator).noise_std == pytest.approx(z * clip / denominator)


def test_a_wrong_noise_scale_would_fail_the_bound() -> None:
    rng = np.random.default_rng(3)
    draws = rng.normal(0.0, 1.05, size=15_049)  # the size of one model above; 5% too much noise
    with pytest.raises(AssertionError):
        _assert_std(draws, 1.0)


def test_noise_is_fresh_per_round_and_reproducible_under_a_key() -> None:
    def draw(key: str, round_no: int) -> np.ndarray:
        return privacy.noise_rng(key, "run-a", 0, round_no).normal(size=100)

    np.testing.assert_array_equal(draw("secret", 3), draw("secret", 3))  # a takeover redraws the same
    assert not np.array_equal(draw("secret", 3), draw("secret", 4))
    assert not np.array_equal(draw("secret", 3), draw("other", 3))
    assert not np.array_equal(privacy.noise_rng("secret", "run-b", 0, 3).normal(size=100), draw("secret", 3))
    assert not np.array_equal(draw("", 3), draw("", 3))  # no key: OS entropy, never the public seed


# ------------------------------------------------------------------------- clipping


def test_clip_bounds_the_norm_and_keeps_small_updates() -> None:
    rng = np.random.default_rng(4)
    for scale in (1e-4, 0.01, 1.0, 100.0):
        upd = _random(rng, scale)
        clipped, norm = privacy.clip(upd, 2.0)
        assert norm == pytest.approx(np.linalg.norm(_flat(upd)))
        assert privacy.l2_norm(clipped) <= 2.0 * (1 + 1e-12)
        if norm <= 2.0:
            np.testing.assert_array_equal(_flat(clipped), _flat(upd))
        else:  # scaled, not truncated: the direction stays
            np.testing.assert_allclose(_flat(clipped) * norm / 2.0, _flat(upd), rtol=1e-6)


def test_one_client_moves_the_central_sum_by_at_most_c_whatever_it_sends_or_claims() -> None:
    rng = np.random.default_rng(5)
    glob = _random(rng)
    honest = [[g + d for g, d in zip(glob, _random(rng, 0.001))] for _ in range(3)]  # norms ~0.12
    clip, d = 0.5, 4

    def mean(updates: list[tuple[list[np.ndarray], int]]) -> np.ndarray:
        acc = NoisyMean(glob, CentralDP(clip, 0.0, d))  # no noise: the sensitivity itself
        acc.begin(glob)
        for tensors, n in updates:
            acc.add(tensors, n)
        return _flat(acc.result(np.random.default_rng(0)))

    without = mean([(m, 10) for m in honest])
    for attack in ([g * 1000 for g in glob], [g - 50 for g in glob]):
        for claimed in (1, 10, 10 ** 9):
            moved = mean([(m, 10) for m in honest] + [(attack, claimed)]) - without
            assert np.linalg.norm(moved) <= clip / d * (1 + 1e-5)
    # Honest updates below C are summed as they are, each with weight 1 (not by sample count).
    want = _flat(glob) + sum(_flat(m) - _flat(glob) for m in honest) / d
    np.testing.assert_allclose(mean([(m, n) for m, n in zip(honest, (1, 50, 10 ** 6))]), want, atol=1e-6)


# ------------------------------------------------------------------------- local DP


def test_local_dp_clips_then_adds_noise_of_std_z_c() -> None:
    rng = np.random.default_rng(6)
    glob = _random(rng)
    far = [g + 10 for g in glob]
    clipped = privacy.privatize(far, glob, 1.5, 0.0, rng)  # no noise: the clipped update alone
    assert privacy.l2_norm([c.astype(np.float64) - g for c, g in zip(clipped, glob)]) <= 1.5 * (1 + 1e-4)
    assert all(c.dtype == np.float32 for c in clipped)
    noised = privacy.privatize([g.copy() for g in glob], glob, 1.5, 2.0, rng)
    _assert_std(_flat(noised) - _flat(glob), 2.0 * 1.5)


def test_local_dp_leaves_tensors_that_are_not_floating_point_alone() -> None:
    glob = [np.zeros((4, 4), np.float32), np.array([3, 4], dtype=np.int64)]
    out = privacy.privatize([np.ones((4, 4), np.float32), np.array([9, 9])], glob, 1.0, 1.0,
                            np.random.default_rng(0))
    np.testing.assert_array_equal(out[1], [3, 4])
    assert out[1].dtype == np.int64 and out[0].dtype == np.float32


# ------------------------------------------------------------------------- accountant


def test_epsilon_is_dp_accountings_rdp_figure_and_a_known_value() -> None:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.1), 7)
    assert privacy.epsilon(1.1, 7, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    # Pinned: 3 rounds at z = 1, delta 1e-5 (dp-accounting 0.4-0.6's RDP accountant, default orders).
    assert privacy.epsilon(1.0, 3, 1e-5) == pytest.approx(9.00996, rel=1e-4)
    # One round of RDP is an upper bound on the exact epsilon of the Gaussian mechanism, and close to it.
    for z in (0.8, 1.0, 2.0, 5.0):
        exact = dp_accounting.get_epsilon_gaussian(z, 1e-5)
        assert exact <= privacy.epsilon(z, 1, 1e-5) <= 1.25 * exact


def test_epsilon_grows_with_rounds_and_falls_with_noise() -> None:
    by_round = [privacy.epsilon(1.0, r, 1e-5) for r in range(1, 8)]
    assert all(a < b for a, b in itertools.pairwise(by_round))
    by_noise = [privacy.epsilon(z, 5, 1e-5) for z in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in itertools.pairwise(by_noise))
    assert privacy.epsilon(1.0, 5, 1e-3) < privacy.epsilon(1.0, 5, 1e-6)


def test_round_metrics_of_a_spec() -> None:
    spec = RunSpec(clients=4, dp="central", dp_clip=2.0, dp_noise=1.5, fraction_fit=0.5).validate()
    m = spec.privacy_metrics(3)
    assert m == {"dp_epsilon": pytest.approx(privacy.epsilon(1.5, 3, 1e-5)), "dp_delta": 1e-5,
                 "dp_noise_std": pytest.approx(1.5 * 2.0 / 2)}  # D: the 2 clients planned per round
    local = dataclasses.replace(spec, dp="local").privacy_metrics(3)
    # Local: two clipped updates differ by up to 2C, so z counts as z / 2.
    assert local["dp_epsilon"] == pytest.approx(privacy.epsilon(0.75, 3, 1e-5))
    assert local["dp_epsilon"] > m["dp_epsilon"] and "dp_noise_std" not in local
    assert RunSpec().validate().privacy_metrics(3) == {}


# ------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kw, needle", [
    ({"dp": "global"}, "unknown dp mode 'global'"),
    ({"dp": "central", "dp_noise": 1.0}, "--dp central needs --dp-clip"),
    ({"dp": "local", "dp_clip": 1.0}, "--dp local needs --dp-noise"),
    ({"dp_clip": 1.0}, "--dp-clip needs --dp central or --dp local"),
    ({"dp_clip": 1.0, "dp_noise": 1.0}, "--dp-clip and --dp-noise need --dp central or --dp local"),
    ({"dp": "central", "dp_clip": 0.0, "dp_noise": 1.0}, "dp clip must be a positive number"),
    ({"dp": "central", "dp_clip": float("inf"), "dp_noise": 1.0}, "dp clip must be a positive number"),
    ({"dp": "central", "dp_clip": 1.0, "dp_noise": 0.0}, "dp noise must be a positive number"),
    ({"dp": "central", "dp_clip": 1.0, "dp_noise": 1.0, "dp_delta": 0.0}, "dp delta must be in (0, 1)"),
    ({"dp": "central", "dp_clip": 1.0, "dp_noise": 1.0, "dp_delta": 0.4}, "must be below 1/clients"),
    ({"dp": "central", "dp_clip": 1.0, "dp_noise": 1.0, "strategy": StrategySpec(name="fedmedian")},
     "--dp central needs a mean-based strategy"),
    ({"dp": "central", "dp_clip": 1.0, "dp_noise": 1.0, "strategy": StrategySpec(name="trimmed-mean")},
     "Use --dp local with trimmed-mean"),
    ({"dp": "central", "dp_clip": 1.0, "dp_noise": 1.0, "strategy": StrategySpec(clip_norm=2.0)},
     "use --dp-clip alone"),
])
def test_bad_dp_settings_are_config_errors(kw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunSpec(clients=3, **kw).validate()
    assert needle in str(err.value)


def test_good_dp_settings_pass_and_round_trip() -> None:
    for kw in ({"dp": "central", "strategy": StrategySpec(name="fedadam")},
               {"dp": "local", "strategy": StrategySpec(name="krum")},  # noise before the server: any combiner
               {"dp": "local", "strategy": StrategySpec(name="fedavg", clip_norm=3.0)}):
        spec = RunSpec(clients=5, dp_clip=1.0, dp_noise=1.0, **kw).validate()
        assert RunSpec.from_dict(spec.to_dict()) == spec
    raw = RunSpec(dp="central", dp_clip=1.0, dp_noise=2.0).to_dict()
    raw.update(dp_clip=1, dp_noise=2)  # JSON hands back 1 for 1.0
    assert RunSpec.from_dict(raw).validate().dp_clip == 1.0


def test_central_dp_strategy_needs_the_rounds_noise_source() -> None:
    glob = _zeros()
    s = Strategy(StrategySpec(), glob, dp=CentralDP(1.0, 1.0, 2))
    with pytest.raises(ValueError, match="noise"):
        s.begin_round(glob)
    with pytest.raises(ConfigError):
        Strategy(StrategySpec(name="krum"), glob, dp=CentralDP(1.0, 1.0, 5))


def test_central_dp_strategy_never_streams_and_draws_its_noise_from_the_round_rng() -> None:
    """Strategy.result() must hand NoisyMean the round's generator on every path: the streaming
    path (no global model) called result() with no rng, which only a type: ignore kept quiet."""
    glob = _zeros()
    s = Strategy(StrategySpec(), glob, dp=CentralDP(1.0, 1.0, 2))
    assert not s.streams_result and not s.streams_parts
    with pytest.raises(ValueError, match="begin_round"):
        s.result()  # before any round: a clear error, never a TypeError about a missing rng
    with pytest.raises(ValueError, match="global model"):
        s.begin_round(None, noise_rng=np.random.default_rng(0))
    results = []
    for seed in (1, 1, 2):
        s.begin_round(glob, noise_rng=np.random.default_rng(seed))
        s.add(_zeros(), 10, "a")
        results.append(_flat(s.result()))
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.array_equal(results[0], results[2])
    assert np.abs(results[0]).max() > 0  # zero updates, so all of it is the round's noise
