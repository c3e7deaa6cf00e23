"""Admission keeps the aggregator's lease: a join phase whose requests take longer to judge than
the lease lasts (a thousand clients on a loaded machine; here fewer, each judged slowly) opens
training under the same driver, never losing the lease half way (ADMIT is fenced by it)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from support.wait import wait_until

from fedq.learning.partition import load_shard
from fedq.learning.scaling import feature_stats
from fedq.learning.spec import RunSpec
from fedq.protocol.store import RunStore
from fedq.roles.aggregator import Aggregator, AggregatorStopped
from fedq.settings import Settings

RUN = "t-admit-lease"
CLIENTS = 12
LEASE = 0.9  # seconds; the judging below takes about 0.15 s x 12 = 1.8 s in one look


def test_a_join_phase_longer_than_the_lease_keeps_it(r: redis.Redis, redis_url: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spec = RunSpec(clients=CLIENTS, rounds=1, run_id=RUN, central_eval=False, round_timeout=60).validate()
    store = RunStore(r, RUN)
    store.create(spec)
    for k in range(CLIENTS):  # all waiting before the aggregator's first look: one look judges them all
        x, _ = load_shard(spec.data, k, CLIENTS)
        assert store.join(f"c{k}", {"shard": k, "rows": len(x)}, feature_stats(x).to_dict()) == "requested"
    judged = Aggregator._join_stats

    def slow(self: Aggregator, *args: Any) -> Any:
        time.sleep(0.15)  # a loaded machine: the lease runs out during the look unless renewed in it
        return judged(self, *args)

    monkeypatch.setattr(Aggregator, "_join_stats", slow)
    settings = Settings.from_env(env={}, redis_url=redis_url, block_seconds=0.2, lease_seconds=LEASE)
    agg = Aggregator(redis.Redis.from_url(redis_url), settings, RUN)
    ended: list[Any] = []

    def drive() -> None:
        try:
            ended.append(agg.run())
        except AggregatorStopped:
            pass  # the test ends before the run does

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    try:
        wait_until(lambda: store.state().get("phase") == "train" or bool(ended), "training to open", timeout=60)
        assert store.state().get("phase") == "train", (store.state(), ended)
        assert len(store.member_ids()) == CLIENTS
        assert store.lease_holder() == agg.driver
        starts = [e for _, e in store.events(100) if e.get("event") == "started"]
        assert len(starts) == 1, starts  # one driving session: never lost, never resumed
    finally:
        agg.stop.set()
        thread.join(timeout=30)
