"""Fault scenarios: real processes, a real Redis started per scenario.

The aggregator is fedq's, without central evaluation (no scenario checks test metrics); the
clients are fedq's CLI with FakeTrainer for Keras (support.fake_client: distinct, checkable
updates, 0.3 s x (shard + 1) of "training" a round), since what breaks here is the protocol, not
the learning: no process loads TensorFlow.

Each scenario breaks something mid-run and asserts that the run still finishes (or fails
with the expected reason), that every round's accepted updates are exactly the ones pushed
for it (nothing lost, nothing counted twice), and that the final model is the FedAvg of the
last round's accepted updates.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
from harness import Federation

pytestmark = pytest.mark.slow


def _finish_clean(fed: Federation, scenario: str, *clients: str) -> None:
    state = fed.wait_end()
    assert state["status"] == "finished", state
    audit = fed.audit()
    fed.record(scenario, audit)
    assert audit.lost == 0 and audit.double_counted == 0
    for name in clients:
        assert fed.exit_code(name) == 0, fed.log(name)


def test_aggregator_sigkill_mid_round_then_a_new_aggregator(federation) -> None:
    fed = federation(clients=2, rounds=3, run_id="agg-kill")
    fed.aggregator("agg-a")
    for k in range(2):
        fed.client(k)
    fed.wait_round(1)
    fed.wait_pushed(2, count=1)  # mid-round: one update of round 2 is stored
    fed.signal("agg-a", signal.SIGKILL)
    killed_at = time.time()
    driver_before = fed.store.state()["driver"]
    fed.aggregator("agg-b")
    _finish_clean(fed, "aggregator SIGKILL, new aggregator", "client-0", "client-1")
    assert fed.store.state()["driver"] != driver_before
    _dead_job_settles(fed, "agg-kill", killed_at, lease=3.0)


def _dead_job_settles(fed: Federation, job_id: str, killed_at: float, lease: float) -> None:
    """rq's own record of the dead worker's job is not left "started": its entry in the started
    registry lapses (rq: the worker's last heartbeat + min(job timeout, lease) + 60 s) and the
    surviving worker's maintenance (every lease) marks it abandoned. The 60 s are rq's; rather
    than wait them out, the entry's expiry is checked and then moved to the past."""
    from rq.registry import StartedJobRegistry

    from fedq.roles.jobs import job_status

    key = StartedJobRegistry("fedq-runs", connection=fed.r).key
    entries = {m: score for m, score in fed.r.zrange(key, 0, -1, withscores=True)
               if m.decode().split(":", 1)[0] == job_id}
    assert all(score <= killed_at + lease + 60 + 5 for score in entries.values()), (entries, killed_at)
    if entries:  # (else rq already settled it: the test ran past the 60 s)
        fed.r.zadd(key, {m: time.time() - 1 for m in entries})
    fed.wait(lambda: job_status(fed.r, job_id) not in ("started", None), "rq to settle the dead job", 30)


def test_clients_sigkilled_or_sigtermed_mid_run_come_back(federation) -> None:
    """client-1 SIGKILLed mid-round and restarted (it rejoins); client-2 stopped by SIGTERM, which
    is a clean exit (0), and started again. Every round needs all three."""
    fed = federation(clients=3, rounds=4, run_id="client-kill")
    fed.aggregator()
    for k in range(3):
        fed.client(k)
    fed.wait_round(1)
    fed.signal("client-1", signal.SIGKILL)
    fed.client(1, name="client-1-again")
    fed.wait_round(2)
    fed.signal("client-2", signal.SIGTERM)
    assert fed.exit_code("client-2", timeout=20) == 0, fed.log("client-2")
    fed.client(2, name="client-2-again")
    _finish_clean(fed, "client SIGKILL, restart; client SIGTERM, rejoin", "client-0", "client-1-again",
                  "client-2-again")
    assert "rejoined" in fed.log("client-1-again")


def test_a_dead_client_stops_holding_rounds_once_its_heartbeat_expires(federation) -> None:
    """A 30 s deadline that a dead client would otherwise cost every round: once its heartbeat
    (2 s here) expires, rounds close as soon as the live clients are in."""
    fed = federation(clients=3, rounds=6, min_clients=2, round_timeout=30, run_id="liveness")
    fed.env["FEDQ_HEARTBEAT_SECONDS"] = "2"
    fed.aggregator()
    for k in range(3):
        fed.client(k)
    fed.wait_round(2)
    fed.signal("client-2", signal.SIGKILL)
    _finish_clean(fed, "client dies: rounds follow liveness", "client-0", "client-1")
    metrics = fed.store.metrics()
    before = metrics[1]["seconds"]  # round 2: all three in (round 1 also builds each client's model)
    after = sorted(m["seconds"] for m in metrics[3:])  # rounds 4-6: client-2 long gone
    assert all(m["missing"] == {"client-2": "heartbeat expired"} for m in metrics[3:]), metrics[3:]
    assert all(sorted(m["clients"]) == ["client-0", "client-1"] for m in metrics[3:])
    assert after[len(after) // 2] <= 2.5 * before, (before, after)  # not the 30 s deadline


def test_below_quorum_fails_with_a_clear_reason(federation) -> None:
    fed = federation(clients=2, rounds=3, round_timeout=2, run_id="no-quorum")
    fed.env["FEDQ_LOG_LEVEL"] = "INFO"
    fed.aggregator()
    fed.client(0)  # client 1 never comes: joining cannot reach the quorum of 2
    state = fed.wait_end(timeout=60)
    fed.record("below quorum: run fails", fed.audit())
    assert state["status"] == "failed"
    assert "only 1 of 2" in state["reason"] and "quorum 2" in state["reason"]


def test_redis_restart_with_append_only_file_loses_nothing(federation) -> None:
    fed = federation(clients=2, rounds=4, run_id="redis-aof",
                     redis_args=("--appendonly", "yes", "--appendfsync", "always"))
    fed.aggregator()
    for k in range(2):
        fed.client(k)
    fed.wait_round(1)
    fed.server.kill(signal.SIGKILL)
    time.sleep(2)  # Redis is away: every process is in its reconnect backoff
    fed.server.start()
    _finish_clean(fed, "Redis SIGKILL + restart with AOF", "client-0", "client-1")


def test_redis_restart_without_persistence_fails_the_run_clearly(federation) -> None:
    fed = federation(clients=2, rounds=4, run_id="redis-nopersist")
    fed.aggregator()
    for k in range(2):
        fed.client(k)
    fed.wait_round(1)
    fed.server.kill(signal.SIGKILL)
    time.sleep(1)
    fed.server.start()  # empty: the run's state is gone
    state = fed.wait_end(timeout=90)
    fed.record("Redis restart, no persistence", None)
    assert state["status"] == "failed" and "vanished" in state["reason"], state
    for k in range(2):
        code = fed.exit_code(f"client-{k}", timeout=60)
        assert code != 0 and "vanished" in fed.log(f"client-{k}")


def test_two_aggregators_racing_for_one_run(federation) -> None:
    fed = federation(clients=2, rounds=3, run_id="race")
    from rq import Queue

    # A second job for the same run: two workers each take one and race for the lease.
    Queue("fedq-runs", connection=fed.r).enqueue_call("fedq.roles.jobs.drive_run", args=("race",),
                                                     job_id="race-duplicate")
    fed.aggregator("agg-a")
    fed.aggregator("agg-b")
    for k in range(2):
        fed.client(k)
    _finish_clean(fed, "two aggregators race for one run", "client-0", "client-1")
    logs = fed.log("agg-a") + fed.log("agg-b")
    assert "standing by" in logs


class CutProxy:
    """A TCP proxy to Redis that the test can cut (drop every connection, refuse new ones)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                down.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                down.close()
                continue
            with self.lock:
                self.conns += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def set_cut(self, cut: bool) -> None:
        if cut:
            self.cut.set()
            with self.lock:
                for s in self.conns:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                self.conns.clear()
        else:
            self.cut.clear()

    def close(self) -> None:
        self.set_cut(True)
        self.listener.close()


def test_clients_that_miss_the_deadline_leave_rounds_to_the_quorum(federation) -> None:
    """After round 1, client-3 is SIGKILLed and never returns, and client-2 is cut off from Redis
    for longer than the 5 s deadline: round 2 closes at its deadline with the quorum (2 of 4),
    client-2 comes back and the run finishes; no later round waits for client-3 (its heartbeat
    lasts 2 s; client-2's the default 15 s, so that it is not taken for gone while cut off)."""
    fed = federation(clients=4, rounds=4, min_clients=2, round_timeout=5, run_id="cut-off")
    proxy = CutProxy(fed.server.port)
    try:
        fed.aggregator()
        for k in (0, 1):
            fed.client(k)
        fed.client(3, env=fed.env | {"FEDQ_HEARTBEAT_SECONDS": "2"})
        env = fed.env | {"FEDQ_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0", "FEDQ_SOCKET_TIMEOUT": "3"}
        fed.client(2, env=env)
        fed.wait_round(1)
        fed.signal("client-3", signal.SIGKILL)
        proxy.set_cut(True)
        fed.wait_round(2, timeout=60)  # closes at its deadline with the quorum
        time.sleep(3)
        proxy.set_cut(False)
        _finish_clean(fed, "client dies, client cut off > deadline (quorum 2 of 4)", "client-0", "client-1",
                      "client-2")
        later = fed.store.metrics()[1:]
        assert later and all(m["num_updates"] >= 2 for m in later)
        assert any(m["num_updates"] == 2 for m in later)
    finally:
        proxy.close()


def test_sigterm_to_the_aggregator_hands_the_run_to_a_standby(federation) -> None:
    fed = federation(clients=2, rounds=4, run_id="agg-term", lease=30.0)
    fed.aggregator("agg-a")
    for k in range(2):
        fed.client(k)
    fed.wait_round(1)
    fed.aggregator("agg-b")  # idle standby worker
    driver = fed.store.state()["driver"]
    t0 = time.monotonic()
    fed.signal("agg-a", signal.SIGTERM)
    assert fed.exit_code("agg-a", timeout=30) == 0, fed.log("agg-a")
    # With a 30 s lease, only the released lease explains a takeover well before it expires.
    fed.wait(lambda: fed.store.state().get("driver") not in (None, driver), "a new driver", timeout=25)
    took = time.monotonic() - t0
    _finish_clean(fed, "SIGTERM aggregator, standby takes over", "client-0", "client-1")
    assert took < 25
