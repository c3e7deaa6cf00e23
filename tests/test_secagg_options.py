"""Secure aggregation's options: defaults, refusals with a reason, fenced publications, central DP's decode."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import redis
from support.cli import assert_error_line, fedq, pipe_env

from fedq.errors import ConfigError
from fedq.learning import privacy
from fedq.learning.spec import RunSpec
from fedq.learning.strategies import StrategySpec
from fedq.protocol.fencing import LeaseLost
from fedq.protocol.keys import RunKeys
from fedq.protocol.secagg.exchange import Coordinator
from fedq.protocol.secagg.quantise import encode_update
from fedq.protocol.store import RunStore
from fedq.roles.secure import SecureSum

SA = RunSpec(clients=4, rounds=1, secure_aggregation=True, run_id="sa-opts")


def test_defaults_are_everyone_and_just_over_half() -> None:
    p = SA.validate().secagg_params()
    assert (p.neighbours, p.reconstruction_threshold, p.clipping_range, p.bits) == (3, 3, 8.0, 22)
    p10 = dataclasses.replace(SA, clients=10).secagg_params()
    assert (p10.num_shares, p10.reconstruction_threshold) == (10, 6)
    again = RunSpec.from_dict(dataclasses.replace(SA, secagg_clip=4, secagg_neighbours=2).to_dict())
    assert again.secagg_clip == 4.0 and again.secagg_neighbours == 2 and again.secure_aggregation


@pytest.mark.parametrize(("change", "needle"), [
    ({"strategy": StrategySpec(name="fedmedian")}, "--strategy fedmedian"),
    ({"strategy": StrategySpec(name="trimmed-mean")}, "--strategy trimmed-mean"),
    ({"strategy": StrategySpec(name="krum", byzantine=0)}, "--strategy krum"),
    ({"strategy": StrategySpec(clip_norm=1.0)}, "--clip-norm"),
    ({"compression": "int8"}, "--compression int8"),
    ({"max_client_share": 0.5}, "--max-client-share"),
    ({"aggregation": "buffered"}, "--aggregation buffered"),
    ({"min_clients": 2}, "--min-clients 2 is below the secure-aggregation threshold 3"),
    ({"secagg_neighbours": 1}, "neighbours must be even"),
    ({"secagg_threshold": 2}, "threshold must be more than half"),
    ({"clients": 1, "secagg_neighbours": None}, "needs at least 2 clients"),
    ({"clients": 2000, "secagg_neighbours": 10, "secagg_threshold": 7, "min_clients": 10}, "overflow 2^32"),
])
def test_refused_combinations_say_why(change: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match="secure") as err:
        dataclasses.replace(SA, **change).validate()  # type: ignore[arg-type]
    assert needle in str(err.value)


def test_secagg_options_need_the_flag() -> None:
    with pytest.raises(ConfigError, match="--secagg-neighbours needs --secure-aggregation"):
        RunSpec(clients=4, secagg_neighbours=2).validate()


def test_central_dp_and_mean_based_server_steps_are_allowed() -> None:
    dataclasses.replace(SA, dp="central", dp_clip=1.0, dp_noise=0.5, dp_delta=1e-3).validate()
    dataclasses.replace(SA, strategy=StrategySpec(name="fedadam")).validate()


def test_the_cli_refuses_before_starting_anything() -> None:
    env = pipe_env(None)
    assert_error_line(fedq("run", "--clients", "4", "--secure-aggregation", "--strategy", "krum", env=env),
                      "--secure-aggregation cannot be used with --strategy krum")
    proc = fedq("simulate", "--clients", "4", "--secure-aggregation", env=env)
    assert proc.returncode == 2 and "do not run secure aggregation" in proc.stderr


def test_publications_are_fenced_by_the_lease(r: redis.Redis) -> None:
    k = RunKeys("sa-fence")
    co = Coordinator(r, k, 1, SA.secagg_params(), b"seed", driver="me")
    r.set(k.lease, "someone-else")
    with pytest.raises(LeaseLost):
        co._publish("roster", b"payload")
    assert r.get(k.secagg_public(1, "roster")) is None
    r.set(k.lease, "me")
    co._publish("roster", b"payload")
    assert r.get(k.secagg_public(1, "roster")) == b"payload" and r.ttl(k.secagg_public(1, "roster")) > 0
    (_, fields), = r.xrange(k.events)
    assert fields == {b"event": b"secagg", b"round": b"1", b"stage": b"roster"}


def test_central_dp_noises_the_unmasked_sum_of_clipped_deltas(r: redis.Redis) -> None:
    spec = dataclasses.replace(SA, dp="central", dp_clip=0.5, dp_noise=0.8, dp_delta=1e-3).validate()
    base = [np.full((3, 2), 0.25, np.float32), np.zeros(2, np.float32)]
    acc = SecureSum(spec, base, RunStore(r, spec.run_id), tick=lambda: None)
    params, rng = spec.secagg_params(), np.random.default_rng(1)
    deltas = [[rng.normal(0, s, b.shape) for b in base] for s in (0.01, 0.1, 3.0)]  # the last is clipped
    clipped = [privacy.clip(d, 0.5)[0] for d in deltas]
    xs = [encode_update([b + c for b, c in zip(base, cl)], base, 1000, params) for cl in clipped]
    total = np.sum([x.astype(np.uint64) for x in xs], axis=0).astype(np.uint32)
    acc._global, acc._rng = base, np.random.default_rng(7)
    got = acc._noisy(total, 3, base)
    noise = privacy.gaussian_noise([b.shape for b in base], 0.8 * 0.5, np.random.default_rng(7))
    for i, b in enumerate(base):
        want = b + (sum(cl[i] for cl in clipped) + noise[i]) / 4  # D: the 4 clients planned per round
        np.testing.assert_allclose(got[i], want, atol=1e-5)
    assert acc.total_examples == 3000  # each sent its clipped delta at full weight


def test_a_stage_gives_up_only_on_clients_seen_alive_then_gone(r: redis.Redis) -> None:
    acc = SecureSum(SA, [np.zeros(2, np.float32)], RunStore(r, SA.run_id), tick=lambda: None)
    k = RunKeys(SA.run_id)
    assert acc._gone(["c0", "c1"]) == set()  # no heartbeat yet: still starting, waited for
    r.set(k.alive("c0"), "{}")
    assert acc._gone(["c0", "c1"]) == set()
    r.delete(k.alive("c0"))
    assert acc._gone(["c0", "c1"]) == {"c0"}  # seen alive, then expired
