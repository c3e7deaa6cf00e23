"""fedq simulate's shared reader of the run's events: clients of a process park rather than each
blocking on Redis, get what RunStore.wait_event would give them, and wake one turn at a time."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import redis

from fedq.protocol import messages
from fedq.protocol.connection import connect
from fedq.protocol.store import RunStore
from fedq.roles.swarm import SharedGlobal, Turns, _open_connections
from fedq.roles.swarm_events import SharedEvents
from fedq.settings import Settings

RUN = "t-swarm-events"


def _event(r: redis.Redis, store: RunStore, **fields: Any) -> str:
    return r.xadd(store.k.events, {k: str(v) for k, v in fields.items()}).decode()


class _Running:
    """How many threads were inside it at once, at most."""

    def __init__(self) -> None:
        self.now, self.most, self._lock = 0, 0, threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            self.now -= 1


def _parked(events: SharedEvents, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(events._parked) < n:
        assert time.monotonic() < deadline, f"{len(events._parked)} of {n} clients parked"
        time.sleep(0.001)


def test_parked_clients_get_what_a_read_of_their_own_would_and_wake_one_turn_at_a_time(r: redis.Redis) -> None:
    store = RunStore(r, RUN)
    first = _event(r, store, event="admitted", client="x")
    turns = Turns(2)
    events = SharedEvents(r, RUN, turns).start()
    got: dict[int, tuple[str, list[dict[str, str]]]] = {}
    running = _Running()

    def client(k: int) -> None:
        with turns.held():
            with turns.away():
                got[k] = events.wait(store, first, 10)
            with running:
                time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    _parked(events, 8)
    _event(r, store, event="round", round=1)
    for t in threads:
        t.join(10)
    events.stop()
    assert not any(t.is_alive() for t in threads)
    assert all(v == store.wait_event(first, 1) for v in got.values()) and len(got) == 8
    assert got[0][1] == [{"event": "round", "round": "1"}]
    assert running.most == 2 and turns._free == 2 and not turns._queue  # every turn given back
    assert events.committed == 1


def test_events_already_kept_come_at_once_and_nothing_waits_past_its_time(r: redis.Redis) -> None:
    store = RunStore(r, RUN)
    start = _event(r, store, event="started")
    events = SharedEvents(r, RUN, Turns(1)).start()
    newer = [_event(r, store, event="admitted", client=f"c{k}") for k in range(3)]
    deadline = time.monotonic() + 10
    while len(events._events) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert events.wait(store, start, 5) == store.wait_event(start, 1)  # kept: no wait
    assert events.wait(store, newer[0], 5) == (newer[2], [{"event": "admitted", "client": f"c{k}"} for k in (1, 2)])
    t0 = time.monotonic()
    assert events.wait(store, newer[2], 0.2) == (newer[2], [])  # nothing new: back when the time is up
    assert 0.15 < time.monotonic() - t0 < 5 and not events._parked
    events.stop()


def test_a_client_behind_the_reader_or_of_another_run_reads_redis_itself(r: redis.Redis) -> None:
    store = RunStore(r, RUN)
    old = _event(r, store, event="created")
    _event(r, store, event="started")  # before the reader began: it never kept this one
    events = SharedEvents(r, RUN, Turns(1)).start()
    assert events.wait(store, old, 1) == (store.last_event_id(), [{"event": "started"}])
    other = RunStore(r, "t-another-run")
    mine = _event(r, other, event="round", round=3)
    assert events.wait(other, "0-0", 1) == (mine, [{"event": "round", "round": "3"}])
    assert events.committed is None  # another run's commit tells nothing of this one
    events.stop()


class _Counting(RunStore):
    looks = 0

    def committed_round(self) -> int:
        self.looks += 1
        return super().committed_round()


def test_the_shared_model_of_a_round_the_events_told_needs_no_look_at_the_round(r: redis.Redis) -> None:
    names, tensors = ["w"], [np.ones(3, np.float32)]
    store = _Counting(r, RUN)
    store.create(_Spec())
    events = SharedEvents(r, RUN, Turns(1)).start()
    assert store.acquire_lease("driver", 30)
    assert store.open_training(b"scaler", messages.encode_global(RUN, 0, names, tensors))  # event: training, round 0
    deadline = time.monotonic() + 10
    while events.committed is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    shared = SharedGlobal(events)
    assert shared.read(store)[0] == 0 and store.looks == 1 and shared.fetches == 1  # the first fetches
    other: list[int] = []
    reader = threading.Thread(target=lambda: other.append(shared.read(store)[0]))
    reader.start()
    reader.join(10)
    assert other == [0] and store.looks == 1  # another client: the model kept, no look
    assert shared.read(store)[0] == 0 and store.looks == 2  # the same client again: it looks
    assert shared.fetches == 1
    events.stop()


class _Spec:
    rounds, clients = 1, 1

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": 1, "clients": 1}


def test_a_simulated_client_opens_its_connections_as_it_starts(redis_url: str) -> None:
    r = connect(Settings.from_env(env={"FEDQ_REDIS_URL": redis_url}), check=False)
    count = redis.Redis.from_url(redis_url)
    before = count.info("clients")["connected_clients"]
    _open_connections(r, 2)
    assert count.info("clients")["connected_clients"] == before + 2
    r.ping()
    r.set("k", "v")
    assert count.info("clients")["connected_clients"] == before + 2  # its commands use them
    r.close()
