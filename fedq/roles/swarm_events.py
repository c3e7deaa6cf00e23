"""The run's events, read once per `fedq simulate` process for all of its clients.

Each simulated client used to block on the run's event stream on a connection of its own, so a
commit woke every client thread of a process at once: each then needed the interpreter's lock
only to queue for its turn (fedq.roles.swarm.Turns), and Redis answered 1,000 blocked reads. Here
one thread per process follows the stream and keeps what it read; a client waiting for events
parks on a lock of its own, and when events come the parked clients are queued for turns in the
order they parked, each woken once, when its turn comes. A client asking for events after an id
the follower did not see from (or for another run) reads Redis itself, as before.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterable
from typing import Protocol

import redis

from fedq.protocol.replies import stream_order
from fedq.protocol.run_records import EVENTS_PER_READ
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Event

log = logging.getLogger("fedq.simulate")

FOLLOW_BLOCK_MS = 1000  # the follower's blocking read: how soon it notices it should stop
KEPT = 10_000  # events kept; beyond, the oldest half is dropped (their readers ask Redis)


class Turns(Protocol):
    """What SharedEvents needs of the process's turns (fedq.roles.swarm.Turns)."""

    def line_up(self, parked: Iterable[threading.Lock]) -> None: ...

    def came_back(self) -> None: ...


class SharedEvents:
    """RunStore.wait_event for the simulated clients of one process (see the module's doc)."""

    def __init__(self, r: redis.Redis, run_id: str, turns: Turns) -> None:
        self.store = RunStore(r, run_id)
        self.run_id = run_id
        self.turns = turns
        self._lock = threading.Lock()
        self._since = (0, 0)  # the events kept are those after this id
        self._orders: list[tuple[int, int]] = []  # ids of the events kept, as stream_order
        self._events: list[tuple[str, dict[str, str]]] = []
        self._parked: list[threading.Lock] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.committed: int | None = None  # the newest round whose commit (or opening) was seen

    def start(self) -> SharedEvents:
        """Follow the stream from its newest event on (before any client reads it)."""
        last = self.store.last_event_id()
        self._since = stream_order(last)
        self._thread = threading.Thread(target=self._follow, args=(last,), name=f"events {self.run_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * FOLLOW_BLOCK_MS / 1000)

    def _follow(self, last: str) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                last, entries = self.store.events_after(last, FOLLOW_BLOCK_MS / 1000, count=1000)
            except redis.RedisError as exc:  # parked clients time out and look at the run themselves
                if not failing:
                    log.warning("run %s: following its events failed: %s", self.run_id, exc)
                failing = True
                self._stop.wait(0.5)
                continue
            failing = False
            if entries:
                self._keep(entries)

    def _keep(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Keep new events and queue the parked clients for turns: each wakes with its turn."""
        with self._lock:
            for eid, fields in entries:
                self._orders.append(stream_order(eid))
                self._events.append((eid, fields))
                if fields.get("event") in (Event.ROUND, Event.TRAINING) and fields.get("round", "").isdigit():
                    self.committed = max(self.committed or 0, int(fields["round"]))
            if len(self._events) > KEPT:
                drop = len(self._events) // 2
                self._since = self._orders[drop - 1]
                del self._orders[:drop], self._events[:drop]
            parked, self._parked = self._parked, []
        self.turns.line_up(parked)

    def _after(self, last: tuple[int, int]) -> list[tuple[str, dict[str, str]]]:
        at = bisect.bisect_right(self._orders, last)
        return self._events[at:at + EVENTS_PER_READ]  # as many as RunStore.wait_event hands out

    def wait(self, st: RunStore, last: str, block_seconds: float) -> tuple[str, list[dict[str, str]]]:
        """As st.wait_event(last, block_seconds), inside the client's Turns.away(): events kept
        at once, else parked until some come (then back with a turn) or the time is up."""
        order = stream_order(last)
        if st.run_id != self.run_id or order < self._since or self._thread is None:
            return st.wait_event(last, block_seconds)
        mine = threading.Lock()
        mine.acquire()
        with self._lock:
            found = self._after(order)
            if not found:
                self._parked.append(mine)
        if not found:
            if not mine.acquire(timeout=max(0.001, block_seconds)):
                with self._lock:
                    if mine in self._parked:  # nothing came: back without a turn
                        self._parked.remove(mine)
                        return last, []
                mine.acquire()  # events came as the time ran out: its turn comes
            self.turns.came_back()
            with self._lock:
                found = self._after(order)
        return (found[-1][0] if found else last), [fields for _eid, fields in found]
