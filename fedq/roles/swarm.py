"""``fedq simulate``: hundreds to thousands of lightweight clients against the real protocol.

Each simulated client is the real client loop (join with statistics of its own rows, fetch the
global model, push an update, follow the round counter) with local training replaced by numpy:
the update is the global weights plus small seeded noise. Many such clients share a process as
threads, so a federation of 1,000 clients fits on one machine; the aggregator is the real one.

Only a few of a process's clients run at a time (TURNS_PER_PROCESS); the others wait their turn,
in order, blocked on a lock of their own. A client gives its turn up while it waits for the run
(its events, its admission, a straggler's delay). Without turns, a commit woke all 250 threads
of a process at once and each then fought the others for the interpreter's lock: a waiting
thread wakes every switch interval to ask for it, so the process burnt its CPU on the fight,
and the lock goes to whichever thread wakes first, so a push could wait seconds behind threads
that came after it (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import redis

from fedq.learning.data import load_dataset
from fedq.learning.spec import RunSpec, load_spec
from fedq.protocol import transfer
from fedq.protocol.connection import connect
from fedq.protocol.store import RunStore
from fedq.roles.client import Client
from fedq.roles.swarm_events import SharedEvents
from fedq.settings import Settings

log = logging.getLogger("fedq.simulate")

# Simulated clients block on the run's events this long at a time (at least): a commit wakes
# them at once whatever it is, but each timeout is a state read, and 1,000 clients timing out
# every second kept a third of two cores busy while they waited (threads of four processes).
SIM_BLOCK_SECONDS = 5.0
# Simulated clients per process, by default (at least 4 processes): on 2 cores, 1,000 clients
# in 10 processes of 100 did worse than in 4 of 250 (bench/simulate_tail.py, docs/benchmarks.md).
CLIENTS_PER_PROCESS = 250
# Clients of a process that run at once. Fewer leave the process idle while each waits for its
# replies from Redis; more fight for the interpreter's lock again (500 clients in 4 processes,
# longest push, one run each at a switch interval of 5 ms: 57 ms with 1 turn, 601 with 2, 66
# and 163 with 4; 2,384 with 16 at 0.5 ms; docs/benchmarks.md). The switch interval is left at
# Python's 5 ms: the threads that woke with a commit each ask for the lock every interval until
# they reach their turn's lock, and at 0.5 ms (once used here) the longest pushes were 47-859 ms.
TURNS_PER_PROCESS = 4
# Connections a simulated client opens as it starts: its own, and its heartbeat's (the heartbeat
# thread refreshes while the client waits, or reads). Opened when first needed, the heartbeat's
# came with its first refresh, in the middle of the rounds (542 of 1,000 clients in rounds 2-3).
CONNECTIONS_PER_CLIENT = 2


def default_processes(clients: int) -> int:
    """How many processes `fedq simulate` spreads `clients` over when not told: one per
    CLIENTS_PER_PROCESS clients, at least 4."""
    return max(4, math.ceil(clients / CLIENTS_PER_PROCESS))


class Turns:
    """At most `count` threads of a process run at once; the others wait their turn, first come
    first served (a turn is handed straight to the longest waiter)."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"turns must be 1 or more, got {count}")
        self._lock = threading.Lock()
        self._free = count
        self._queue: deque[threading.Lock] = deque()
        self._local = threading.local()  # came_back: this thread was handed its turn while away

    def _take(self) -> None:
        with self._lock:
            if self._free and not self._queue:
                self._free -= 1
                return
            mine = threading.Lock()
            mine.acquire()
            self._queue.append(mine)
        mine.acquire()  # released by the thread that hands this turn on

    def _give(self) -> None:
        with self._lock:
            if self._queue:
                self._queue.popleft().release()
            else:
                self._free += 1

    def line_up(self, parked: Iterable[threading.Lock]) -> None:
        """Queue threads parked on locks of their own (held) for turns, in order: each lock is
        released when its thread's turn comes, so that a thread wakes once, with its turn
        (it then says so with came_back), rather than all of them at once to queue."""
        with self._lock:
            for mine in parked:
                if self._free and not self._queue:
                    self._free -= 1
                    mine.release()
                else:
                    self._queue.append(mine)

    def came_back(self) -> None:
        """Inside away(): this thread holds a turn again (line_up handed it one)."""
        self._local.back = True

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A turn, for the whole block."""
        self._take()
        try:
            yield
        finally:
            self._give()

    @contextlib.contextmanager
    def away(self) -> Iterator[None]:
        """Inside held(): the turn given up for the block (a wait), and taken back after it
        (unless the block came back with one: came_back)."""
        self._give()
        self._local.back = False
        try:
            yield
        finally:
            if not self._local.back:
                self._take()
            self._local.back = False


class NoiseTrainer:
    """Training without TensorFlow: returns the global weights plus N(0, scale) noise."""

    def __init__(self, names: list[str], num_examples: int, seed: int, scale: float = 1e-3) -> None:
        self.names = names
        self.num_examples = num_examples
        self.rng = np.random.default_rng(seed)
        self.scale = scale
        self._w: list[np.ndarray] = []

    def load(self, tensors: list[np.ndarray]) -> None:
        self._w = tensors

    def train(self, round_no: int) -> dict[str, float]:
        return {"loss": float(self.rng.uniform(0.1, 0.5)), "accuracy": float(self.rng.uniform(0.7, 0.9))}

    def weights(self) -> list[np.ndarray]:
        if self.scale == 0:
            return self._w  # no training at all: the update is the global model (benchmarks)
        return [(t + self.rng.normal(0.0, self.scale, t.shape)).astype(t.dtype) if t.dtype.kind == "f" else t
                for t in self._w]


class SharedGlobal:
    """The global model fetched once per round for all the simulated clients of a process,
    instead of once per client: with N clients in a process, one copy of the model, not N.
    The tensors are made read-only, as every client holds the same arrays.

    With the process's SharedEvents, a model kept of the newest round whose commit the events
    told is handed out without a look at the run's round counter; a client asking again for the
    same round (it found the model stale: the events lagged its own look) gets that look."""

    def __init__(self, events: SharedEvents | None = None) -> None:
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[int, list[str], list[np.ndarray]]] = {}
        self.fetches = 0
        self.events = events
        self._served = threading.local()  # (run, round) this thread was last handed

    def read(self, store: RunStore) -> tuple[int, list[str], list[np.ndarray]]:
        """(round, names, tensors) of the run's current global model (transfer.read_global)."""
        known = self.events.committed if self.events is not None and self.events.run_id == store.run_id else None
        cached = self._cache.get(store.run_id)
        if cached is not None and cached[0] == known and getattr(self._served, "model", None) != (store.run_id, known):
            return self._serve(store.run_id, cached)
        committed = store.committed_round()  # the state and the global model move in one commit
        with self._lock:  # the others wait for the one fetch rather than each making their own
            cached = self._cache.get(store.run_id)
            if cached is not None and cached[0] == committed:
                return self._serve(store.run_id, cached)
            round_no, names, tensors = transfer.read_global(store)
            for t in tensors:
                t.flags.writeable = False
            self._cache[store.run_id] = (round_no, names, tensors)
            self.fetches += 1
            return self._serve(store.run_id, self._cache[store.run_id])

    def _serve(self, run_id: str, model: tuple[int, list[str], list[np.ndarray]]) -> tuple[int, list[str],
                                                                                             list[np.ndarray]]:
        self._served.model = (run_id, model[0])
        return model


def noise_trainers(store: RunStore, scale: float = 1e-3, shared: SharedGlobal | None = None) -> Any:
    """A Client trainer_factory making NoiseTrainers for the run in store; with shared, the
    weight names come from the process's one fetch of the global model."""
    def factory(spec: RunSpec, num_features: int, num_classes: int, x: Any, y: Any, shard: int,
                stop: threading.Event) -> NoiseTrainer:
        if shared is not None:
            names = shared.read(store)[1]
        else:
            names = [t.name for t in transfer.global_template(store)[1]]  # names only: no parts read
        return NoiseTrainer(names, len(y), seed=spec.seed * 1_000_003 + shard, scale=scale)

    return factory


def client_commands(spec: RunSpec, processes: int, scale: float = 1e-3,
                    stragglers: tuple[int, float] = (0, 0.0)) -> list[tuple[str, list[str]]]:
    """`fedq sim-worker` commands that split the run's shards over `processes` processes; with
    stragglers (M, seconds), the last M shards add that delay to every update."""
    parts = np.array_split(np.arange(spec.clients), max(1, min(processes, spec.clients)))
    slow = ["--delay-from", str(spec.clients - stragglers[0]), "--delay", repr(stragglers[1])] if stragglers[0] else []
    return [(f"sim-worker-{i}", ["sim-worker", "--run", spec.run_id, "--first", str(int(p[0])),
                                 "--count", str(len(p)), "--scale", repr(scale), *slow])
                 for i, p in enumerate(parts) if len(p)]


def _open_connections(r: redis.Redis, count: int) -> None:
    """Open count connections of r's pool now (they stay in the pool for its commands)."""
    pool = r.connection_pool
    opened = [pool.get_connection() for _ in range(count)]
    for conn in opened:
        pool.release(conn)


def run_worker(settings: Settings, run_id: str, first: int, count: int, scale: float = 1e-3,
               delay: tuple[int, float] | None = None) -> int:
    """Run shards first..first+count-1 as threads taking turns; returns how many clients failed. scale is
    the noise of their updates (0: each sends the global model back, a no-op round); delay
    (first straggler shard, seconds) slows the shards from that one on."""
    from threadpoolctl import threadpool_limits

    # Hundreds of threads each calling into a multi-threaded BLAS would each get its pools and
    # buffers; one BLAS thread per process, and the dataset loaded once before the threads start.
    threadpool_limits(1)
    if settings.block_seconds < SIM_BLOCK_SECONDS and settings.lease_seconds >= 3 * SIM_BLOCK_SECONDS:
        settings = dataclasses.replace(settings, block_seconds=SIM_BLOCK_SECONDS)
    r0 = connect(settings)
    load_dataset(load_spec(RunStore(r0, run_id)).data)
    failures: list[str] = []
    turns = Turns(TURNS_PER_PROCESS)
    events = SharedEvents(r0, run_id, turns).start()  # before any client reads the run's events
    shared = SharedGlobal(events)

    def one(shard: int) -> None:
        with turns.held():
            r = connect(settings, check=False)  # Redis was reached above
            _open_connections(r, CONNECTIONS_PER_CLIENT)
            try:
                Client(r, settings, shard, run_id=run_id,
                       trainer_factory=noise_trainers(RunStore(r, run_id), scale, shared),
                       global_reader=shared.read, waiting=turns.away, event_waiter=events.wait,
                       delay=delay[1] if delay is not None and shard >= delay[0] else 0.0).serve(once=True)
            except Exception as exc:  # counted and reported; one client must not stop the rest
                log.error("client-%d failed: %s", shard, exc)
                failures.append(f"client-{shard}")
            finally:
                r.close()

    threads = [threading.Thread(target=one, args=(k,), name=f"client-{k}", daemon=True)
               for k in range(first, first + count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events.stop()
    r0.close()
    return len(failures)
