"""Heartbeats against real Redis: keys with an expiry, refreshed while alive, gone after a crash."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from support.procs import Proc, cli_env
from support.redis import free_port
from support.wait import wait_until

from fedq.protocol import heartbeat, keys


def test_client_heartbeat_is_a_key_with_expiry_that_stays_while_refreshed(r: redis.Redis) -> None:
    hb = heartbeat.client_heartbeat(r, "run-a", "client-0", ttl=0.6, shard=0).start()
    try:
        key = keys.RunKeys("run-a").alive("client-0")
        assert key == "fedq:{run-a}:c:client-0:alive"
        assert 0 < r.pttl(key) <= 600
        rec = json.loads(r.get(key))
        assert rec["role"] == "client" and rec["id"] == "client-0" and rec["run"] == "run-a"
        assert rec["shard"] == 0 and rec["pid"] == os.getpid() and rec["host"]
        assert abs(rec["time"] - time.time()) < 2
        time.sleep(1.5)  # well past one TTL: only the refreshes keep it
        assert r.exists(key)
        assert json.loads(r.get(key))["time"] > rec["time"]
        hb.update(round=3, last_push=123.5)  # written at once, not at the next refresh
        rec = json.loads(r.get(key))
        assert rec["round"] == 3 and rec["last_push"] == 123.5
    finally:
        hb.stop()
    assert not r.exists(key), "a clean stop deletes the heartbeat"


def test_a_crashed_process_is_gone_after_the_ttl(r: redis.Redis) -> None:
    alive = heartbeat.client_heartbeat(r, "run-b", "client-0", ttl=5).start()
    crashed = heartbeat.client_heartbeat(r, "run-b", "client-1", ttl=0.4).start()
    try:
        assert set(heartbeat.alive_clients(r, "run-b")) == {"client-0", "client-1"}
        crashed.stop(delete=False)  # as if the process died: no more refreshes, no delete
        assert "client-1" in heartbeat.alive_clients(r, "run-b")
        wait_until(lambda: set(heartbeat.alive_clients(r, "run-b")) == {"client-0"},
                   "the crashed client's heartbeat to expire", timeout=5, every=0.05, ignore=(Exception,))
    finally:
        alive.stop()
        crashed.stop()


def test_readers_scan_past_other_keys_and_other_runs(r: redis.Redis) -> None:
    # Enough unrelated keys that SCAN needs several round trips to cover the keyspace.
    pipe = r.pipeline(transaction=False)
    for i in range(3000):
        pipe.set(f"other:{i}", 1)
    pipe.execute()
    beats = [heartbeat.client_heartbeat(r, "run-c", f"client-{k}", ttl=30, shard=k).start() for k in range(3)]
    beats.append(heartbeat.client_heartbeat(r, "run-d", "client-0", ttl=30).start())
    beats.append(heartbeat.aggregator_heartbeat(r, "agg-1", ttl=30, queue="q").start())
    try:
        found = heartbeat.alive_clients(r, "run-c")
        assert sorted(found) == ["client-0", "client-1", "client-2"]
        assert [found[f"client-{k}"]["shard"] for k in range(3)] == [0, 1, 2]
        assert heartbeat.count_alive_clients(r, "run-c") == 3
        assert heartbeat.count_alive_clients(r, "run-c", ["client-0", "client-2", "client-9"]) == 2
        assert heartbeat.count_alive_clients(r, "run-c", []) == 0
        assert sorted(heartbeat.client_heartbeats(r, "run-c", ["client-1", "client-9"])) == ["client-1"]
        assert list(heartbeat.alive_clients(r, "run-d")) == ["client-0"]
        aggs = heartbeat.alive_aggregators(r)
        assert list(aggs) == ["agg-1"] and aggs["agg-1"]["role"] == "aggregator" and aggs["agg-1"]["queue"] == "q"
        assert heartbeat.alive_clients(r, "run-none") == {}
    finally:
        for hb in beats:
            hb.stop()
    assert heartbeat.alive_aggregators(r) == {}


def test_extra_fields_are_read_at_each_beat_and_a_failing_extra_does_not_stop_it(r: redis.Redis) -> None:
    calls = {"n": 0}

    def extra() -> dict:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("flaky")
        return {"run": f"run-{calls['n']}"}

    hb = heartbeat.aggregator_heartbeat(r, "agg-x", ttl=0.3, extra=extra).start()
    try:
        wait_until(lambda: calls["n"] >= 4, "three beats", timeout=5, every=0.05, ignore=(Exception,))
        assert json.loads(r.get(keys.aggregator_alive("agg-x")))["run"].startswith("run-")
    finally:
        hb.stop()


def test_heartbeat_rides_out_an_unreachable_redis() -> None:
    gone = redis.Redis(port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    hb = heartbeat.client_heartbeat(gone, "run-e", "client-0", ttl=0.3).start()  # must not raise
    time.sleep(0.4)
    assert hb.beat() is False
    t0 = time.monotonic()
    hb.stop()  # nor here, and it does not hold the process up
    assert time.monotonic() - t0 < 2.5


def test_aggregator_worker_keeps_a_heartbeat_until_it_stops(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    worker = Proc("aggregator", ["aggregator", "--queue", "fedq-hb-test"], cli_env(redis_url), tmp_path)
    try:
        aggs = wait_until(lambda: heartbeat.alive_aggregators(r), "the worker's heartbeat",
                          timeout=60, ignore=(Exception,))
        (name, rec), = aggs.items()
        assert rec["role"] == "aggregator" and rec["pid"] == worker.proc.pid and rec["queue"] == "fedq-hb-test"
        assert rec.get("run") is None  # idle
        assert 0 < r.pttl(keys.aggregator_alive(name)) <= heartbeat.DEFAULT_TTL * 1000
        # rq installs its SIGTERM handler only after it logs that it listens; a SIGTERM before that
        # kills the worker uncleanly (the heartbeat then only expires), so wait for the line.
        wait_until(lambda: "Listening on" in worker.text(), "the worker to listen", timeout=60)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.text()
        assert heartbeat.alive_aggregators(r) == {}, "a worker that stops cleanly removes its heartbeat"
    finally:
        worker.stop()
