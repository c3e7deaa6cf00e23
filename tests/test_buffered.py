"""Buffered aggregation (FedBuff) against a real Redis: the aggregator in-process, clients as direct
pushes tagged with the version they trained from, so each test knows exactly what every version
must hold. Versions, stale and already-folded refusals, re-pushes, and a takeover mid-buffer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from support.cli import assert_error_line, fedq, pipe_env
from support.federation import Federation, noisy
from support.initial import store_initial
from support.wait import wait_until

from fedq.learning.aggregate import fedavg
from fedq.learning.spec import RunSpec
from fedq.learning.staleness import staleness_weight

pytestmark = pytest.mark.slow


@pytest.fixture()
def buffered(federation_factory: Callable[..., Federation], r: redis.Redis) -> Callable[..., Federation]:
    """make(run_id, rounds, buffer_size, max_staleness, **settings): three clients c0..c2 that
    state no row counts, no central evaluation, the initial model stored with the run
    (support.initial): no TensorFlow anywhere."""

    def make(run_id: str, rounds: int, buffer_size: int, max_staleness: int, **settings: Any) -> Federation:
        store_initial(r, run_id)
        spec = RunSpec(clients=3, rounds=rounds, round_timeout=60, run_id=run_id, central_eval=False,
                       aggregation="buffered", buffer_size=buffer_size, max_staleness=max_staleness)
        return federation_factory(spec, state_rows=False, **settings)

    return make


def _push(h: Federation, cid: str, base: int, tensors: list[np.ndarray], n: int, window: int | None = None) -> str:
    """Push an update trained from version `base` (round base + 1), as a buffered client does."""
    _, names, _ = h.global_model()
    payload = h.update(cid, base + 1, n, tensors, names)
    return h.store.push_update(cid, base + 1, payload, h.settings.max_update_bytes,
                               window=h.spec.staleness_limit if window is None else window)


def _judged(h: Federation, cid: str, outcome: str) -> int:
    return sum(1 for j in h.store.judged() if j["client"] == cid and j["outcome"] == outcome)


def _close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_versions_fold_stale_updates_refuse_older_ones_and_repushes_replace(buffered) -> None:
    h = buffered("t-buffered", rounds=3, buffer_size=2, max_staleness=1)
    _, _, v0 = h.global_model()
    a, b, late = noisy(v0, 1), noisy(v0, 2), noisy(v0, 3)
    assert _push(h, "c0", 0, a, 100) == "ok"
    assert _push(h, "c1", 0, b, 300) == "ok"
    h.wait_round(1)
    _, _, v1 = h.global_model()
    _close(v1, fedavg([(a, 100), (b, 300)]))  # fresh updates only: FedAvg
    # Version 1 folded c0's update trained from version 0: a re-push for that base never doubles.
    assert _push(h, "c0", 0, noisy(v0, 9), 100) == "already_folded"

    # Version 2: c2's update is one version stale (weight 1/sqrt(2)), c1's fresh.
    assert _push(h, "c2", 0, late, 100) == "ok"
    wait_until(lambda: _judged(h, "c2", "accepted") == 1, "c2's stale update to be judged")
    fresh = noisy(v1, 4)
    assert _push(h, "c1", 1, fresh, 100) == "ok"
    h.wait_round(2)
    _, _, v2 = h.global_model()
    s = staleness_weight("inverse-sqrt", 1)
    _close(v2, [c + (100 * (f - c) + s * 100 * (lt - o)) / 200 for c, f, lt, o in zip(v1, fresh, late, v0)])
    m2 = h.store.metrics()[1]
    assert m2["num_updates"] == 2 and (m2["staleness_mean"], m2["staleness_max"]) == (0.5, 1)
    assert sorted((u["client"], u["base"], u["staleness"]) for u in m2["updates"]) == [("c1", 1, 0), ("c2", 0, 1)]

    # Version 3: from version 2, version 0 is two behind: refused at the push, and by the
    # aggregator when written around it (the push step runs as the client, which may skip it).
    assert _push(h, "c0", 0, noisy(v0, 5), 100) == "stale"
    _write_around_the_push(h, "c2", 0, noisy(v0, 6))
    wait_until(lambda: _judged(h, "c2", "stale") == 1, "the aggregator to refuse c2's stale update")
    before = noisy(v2, 7)
    assert _push(h, "c0", 2, before, 100) == "ok"
    wait_until(lambda: _judged(h, "c0", "accepted") == 2, "c0's first push for base 2 to be judged")
    replaced = noisy(v2, 8)
    assert _push(h, "c0", 2, replaced, 300) == "ok"  # replaces its push for base 2
    wait_until(lambda: _judged(h, "c0", "accepted") == 3, "c0's re-push to be judged")
    one_behind = noisy(v1, 9)
    assert _push(h, "c2", 1, one_behind, 100) == "ok"
    h.wait_round(3)
    _, _, v3 = h.global_model()
    _close(v3, [c + (300 * (r - c) + s * 100 * (x - o)) / 400 for c, r, x, o in zip(v2, replaced, one_behind, v1)])
    assert h.store.metrics()[2]["num_examples"] == 400  # the replaced push counted once, with its new count
    refused = [(x["client"], x["reason"]) for x in h.store.refused()]
    assert ("c0", "already_folded") in refused and ("c0", "stale") in refused
    assert h.store.state()["status"] == "finished"


def test_the_aggregator_refuses_folded_and_stale_updates_written_around_the_push(buffered) -> None:
    """A client may write its own update key directly: the aggregator's checks are the ones that count."""
    h = buffered("t-buffered-door", rounds=2, buffer_size=2, max_staleness=1)
    _, _, v0 = h.global_model()
    assert _push(h, "c0", 0, noisy(v0, 1), 100) == "ok"
    assert _push(h, "c1", 0, noisy(v0, 2), 100) == "ok"
    h.wait_round(1)
    _write_around_the_push(h, "c0", 0, noisy(v0, 3))  # a second update for base 0, after version 1 folded one
    wait_until(lambda: _judged(h, "c0", "already_folded") == 1, "the aggregator to refuse c0's second update")
    _, _, v1 = h.global_model()
    assert _push(h, "c2", 0, noisy(v0, 4), 100) == "ok"  # one version behind: folded
    assert _push(h, "c1", 1, noisy(v1, 5), 100) == "ok"
    h.wait_round(2)
    assert h.store.metrics()[1]["num_updates"] == 2
    assert (h.store.metrics()[1]["staleness_mean"], h.store.metrics()[1]["staleness_max"]) == (0.5, 1)
    reasons = [(x["client"], x["round"], x["reason"]) for x in h.store.refused() if x["stage"] == "aggregate"]
    assert reasons == [("c0", 1, "already_folded")]


def _write_around_the_push(h: Federation, cid: str, base: int, tensors: list[np.ndarray]) -> None:
    """What a client can do without the push step: write its update key itself and wake the aggregator."""
    _, names, _ = h.global_model()
    key = h.store.k.update(cid, base + 1)
    h.store.r.set(h.store.k.update_body(cid, base + 1), h.update(cid, base + 1, 100, tensors, names))
    h.store.r.hset(key, "parts", "")
    h.store.r.hincrby(key, "seq", 1)
    h.store.r.rpush(h.store.k.inbox, cid)


def test_takeover_mid_buffer_loses_nothing_and_counts_nothing_twice(buffered) -> None:
    h = buffered("t-buffered-takeover", rounds=2, buffer_size=3, max_staleness=2, lease_seconds=3.0)
    _, _, v0 = h.global_model()
    ups = {cid: noisy(v0, k) for k, cid in enumerate(("c0", "c1", "c2"))}
    assert _push(h, "c0", 0, ups["c0"], 100) == "ok"
    wait_until(lambda: _judged(h, "c0", "accepted") == 1, "c0's update to be folded")
    h.stop_aggregator()  # the buffer holds c0's update, in memory only
    assert _push(h, "c1", 0, ups["c1"], 200) == "ok"  # while nobody drives
    h.start_aggregator()
    wait_until(lambda: _judged(h, "c1", "accepted") == 1, "the new driver to fold c1's update")
    assert _push(h, "c2", 0, ups["c2"], 300) == "ok"
    h.wait_round(1)
    _, _, v1 = h.global_model()
    _close(v1, fedavg([(ups["c0"], 100), (ups["c1"], 200), (ups["c2"], 300)]))
    m1 = h.store.metrics()[0]
    assert m1["num_updates"] == 3 and m1["num_examples"] == 600
    # And after the commit, a takeover starts from an empty buffer: version 1's updates are consumed.
    h.stop_aggregator()
    h.start_aggregator()
    more = {cid: noisy(v1, 10 + k) for k, cid in enumerate(("c0", "c1", "c2"))}
    for cid, tensors in more.items():
        assert _push(h, cid, 1, tensors, 100) == "ok"
    h.wait_round(2)
    _, _, v2 = h.global_model()
    _close(v2, fedavg([(t, 100) for t in more.values()]))
    assert h.store.metrics()[1]["num_updates"] == 3
    assert not any(x["stage"] == "aggregate" for x in h.store.refused())


@pytest.mark.parametrize(("args", "needle"), [
    (("--strategy", "krum", "--clients", "5"), "--strategy krum needs Krum's scores over a whole round's updates"),
    (("--dp", "central", "--dp-clip", "1", "--dp-noise", "1", "--clients", "5"),
     "dp central cannot be used with --aggregation buffered"),
])
def test_submit_refuses_what_buffering_cannot_serve(redis_url: str, args: tuple[str, ...], needle: str) -> None:
    proc = fedq("submit", "--aggregation", "buffered", *args, env=pipe_env(redis_url))
    assert_error_line(proc, needle)


def test_fedq_run_buffered_with_a_straggler(tmp_path: Path) -> None:
    """Real processes: an aggregator and three clients, one of them slowed; versions commit without
    waiting for it, and its late updates are folded stale (or refused past the limit), all reported."""
    out = tmp_path / "out"
    proc = fedq("run", "--clients", "3", "--rounds", "4", "--local-epochs", "1", "--aggregation", "buffered",
                "--buffer-size", "2", "--max-staleness", "2", "--straggler-clients", "1", "--straggler-delay", "4",
                "--out", str(out), env=pipe_env(None, FEDQ_TF_THREADS="1"), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "version 4/4" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "finished"
    assert report["aggregation"]["mode"] == "buffered" and report["aggregation"]["buffer_size"] == 2
    versions = report["rounds"]
    assert [m["version"] for m in versions] == [1, 2, 3, 4]
    assert all(m["num_updates"] >= 2 and 0 <= m["staleness_max"] <= 2 for m in versions)
    # Versions went on without the straggler (client-2, 4 s per update) most of the time.
    with_straggler = sum("client-2" in m["clients"] for m in versions)
    assert with_straggler < len(versions), versions
    assert report["final"]["test_accuracy"] > 0.7


def test_a_client_with_a_stale_and_a_fresh_update_in_one_version_is_recorded_whole(buffered) -> None:
    """c2's update trained from version 0 arrives after version 1: it is folded stale into version 2
    beside c2's fresh one. The record keeps both (updates) and c2's entry counts both (clients)."""
    h = buffered("t-buffered-twice", rounds=2, buffer_size=2, max_staleness=1)
    _, _, v0 = h.global_model()
    assert _push(h, "c0", 0, noisy(v0, 1), 100) == "ok"
    assert _push(h, "c1", 0, noisy(v0, 2), 100) == "ok"
    h.wait_round(1)
    _, _, v1 = h.global_model()
    assert _push(h, "c2", 0, noisy(v0, 3), 70) == "ok"
    wait_until(lambda: _judged(h, "c2", "accepted") == 1, "c2's stale update to be judged")
    assert _push(h, "c2", 1, noisy(v1, 4), 30) == "ok"
    h.wait_round(2)
    m2 = h.store.metrics()[1]
    assert sorted((u["client"], u["base"], u["num_examples"]) for u in m2["updates"]) == [("c2", 0, 70), ("c2", 1, 30)]
    accepted = {j["digest"] for j in h.store.judged() if j["client"] == "c2" and j["outcome"] == "accepted"}
    assert {u["digest"] for u in m2["updates"]} == accepted
    c2 = m2["clients"]["c2"]
    assert (c2["num_examples"], c2["updates"], c2["staleness"]) == (100, 2, 0)
    assert m2["num_examples"] == 100 and m2["num_updates"] == 2
