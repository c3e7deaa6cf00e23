"""Liveness in Redis: a key with an expiry that a process keeps alive while it runs.

A client keeps ``fedq:{RUN}:alive:<client id>`` alive, an aggregator worker
``fedq:aggregators:<name>``. Each holds a small JSON record (role, id, host, pid, run,
round, last push, time of the write). A process that dies stops refreshing its key and
Redis deletes it after the TTL, which is how the dashboard and ``fedq status`` tell who is
gone. The readers here only read (SCAN with MATCH and COUNT, then MGET; never KEYS).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from fedq.errors import ConfigError
from fedq.protocol import guarded, keys

log = logging.getLogger("fedq.protocol.heartbeat")

DEFAULT_TTL = 15.0  # seconds a heartbeat outlives its last refresh
SCAN_COUNT = 500


class Heartbeat:
    """A daemon thread that keeps one key alive with SET ... PX ttl, refreshed every ttl/3.

    ``extra`` (optional) is called at each refresh for fields that change on their own
    (e.g. the job an rq worker is running); ``update`` sets fields and writes at once.
    ``stop`` ends the thread and deletes the key, so a clean exit is not mistaken for a
    crash; a crashed process simply stops refreshing and the key expires.
    """

    def __init__(self, r: redis.Redis, key: str, ttl: float = DEFAULT_TTL, *,
                 extra: Callable[[], dict[str, Any]] | None = None, **fields: Any) -> None:
        if ttl <= 0:
            raise ValueError(f"heartbeat ttl must be positive, got {ttl}")
        self.r = r
        self.key = key
        self.ttl = float(ttl)
        self.extra = extra
        self.fields: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), **fields}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._delete = True

    @property
    def interval(self) -> float:
        return self.ttl / 3

    def record(self) -> dict[str, Any]:
        """The JSON record the next write stores."""
        with self._lock:
            rec = dict(self.fields)
        if self.extra is not None:
            try:
                rec.update(self.extra())
            except Exception as exc:  # a broken extra must not silence the heartbeat itself
                log.debug("heartbeat extra fields failed: %s", exc)
        rec["time"] = time.time()
        rec["ttl"] = self.ttl
        return rec

    def beat(self) -> bool:
        """Write the record now with a fresh expiry; False (logged once) if Redis is away."""
        try:
            self.r.set(self.key, json.dumps(self.record()), px=max(1, int(self.ttl * 1000)))
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("heartbeat %s not written: %s", self.key, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeat %s written again", self.key)
        self._failing = False
        return True

    def start(self) -> Heartbeat:
        """Write the first heartbeat and start refreshing it in a daemon thread."""
        if self._thread is not None:
            return self
        self._stop.clear()
        self.beat()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat {self.key}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
        if self._delete:
            self._remove()

    def _remove(self) -> None:
        try:
            self.r.delete(self.key)
        except redis.RedisError as exc:
            log.warning("heartbeat %s not deleted (it expires in %g s): %s", self.key, self.ttl, exc)

    def update(self, **fields: Any) -> None:
        """Change fields (e.g. round=3, last_push=time.time()) and write them at once."""
        with self._lock:
            self.fields.update(fields)
        if self._thread is not None and not self._stop.is_set():
            self.beat()

    def stop(self, delete: bool = True, timeout: float = 2.0) -> None:
        """Stop refreshing; delete the key unless delete=False (then it expires on its own).

        Waits at most timeout seconds: with Redis away, the delete is left to the daemon
        thread (the key expires anyway) rather than holding up the process's exit.
        """
        self._delete = delete
        self._stop.set()
        if self._thread is None:
            if delete:
                self._remove()
            return
        self._thread.join(timeout=timeout)
        self._thread = None

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *_exc: Any) -> None:
        self.stop()


def client_heartbeat(r: redis.Redis, run_id: str, client_id: str, ttl: float = DEFAULT_TTL,
                     **fields: Any) -> Heartbeat:
    """A (not yet started) heartbeat of one client in one run."""
    return Heartbeat(r, keys.RunKeys(run_id).alive(client_id), ttl, role="client", id=client_id,
                     run=run_id, **fields)


def aggregator_heartbeat(r: redis.Redis, name: str, ttl: float = DEFAULT_TTL, *,
                         extra: Callable[[], dict[str, Any]] | None = None, **fields: Any) -> Heartbeat:
    """A (not yet started) heartbeat of one aggregator worker."""
    return Heartbeat(r, keys.aggregator_alive(name), ttl, extra=extra, role="aggregator", id=name, **fields)


# --- readers (read-only: SCAN, MGET, PTTL) ----------------------------------------------------
def _scan_names(r: redis.Redis, pattern: str) -> list[str]:
    # SCAN may return a key twice; a set makes each name count once.
    return sorted({k.decode() if isinstance(k, bytes) else k for k in r.scan_iter(match=pattern, count=SCAN_COUNT)})


def _records(ids: list[str], raws: Sequence[bytes | str | None]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for ident, raw in zip(ids, raws):
        if raw is None:  # expired between SCAN and GET
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        out[ident] = rec if isinstance(rec, dict) else {}
    return out


def alive_clients(r: redis.Redis, run_id: str) -> dict[str, dict[str, Any]]:
    """Client id -> heartbeat record, for the clients of run_id whose heartbeat has not expired."""
    k = keys.RunKeys(run_id)
    names = [n for n in _scan_names(r, k.client_keys_pattern("alive")) if n == _alive_key(k, k.client_of(n))]
    # One pipeline: a run's keys share a hash tag, so this also works on Redis Cluster. The keys
    # are the clients' own: any type or size, read through the guard.
    return _records([k.client_of(n) for n in names], guarded.strings(r, names))


def _alive_key(k: keys.RunKeys, client_id: str) -> str:
    """The heartbeat key of client_id, or '' when the id is no valid client id."""
    try:
        return k.alive(client_id)
    except ConfigError:
        return ""


def client_heartbeats(r: redis.Redis, run_id: str, client_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Like alive_clients, for known client ids: one MGET, no scan of the keyspace."""
    if not client_ids:
        return {}
    k = keys.RunKeys(run_id)
    return _records(client_ids, guarded.strings(r, [k.alive(c) for c in client_ids]))


def count_alive_clients(r: redis.Redis, run_id: str, client_ids: list[str] | None = None) -> int:
    """How many clients of run_id have a live heartbeat (of client_ids, when given: one EXISTS)."""
    k = keys.RunKeys(run_id)
    if client_ids is not None:
        return int(r.exists(*[k.alive(c) for c in client_ids])) if client_ids else 0
    return len(_scan_names(r, k.client_keys_pattern("alive")))


def alive_aggregators(r: redis.Redis) -> dict[str, dict[str, Any]]:
    """Aggregator name -> heartbeat record, for every aggregator whose heartbeat has not expired."""
    names = _scan_names(r, keys.aggregators_pattern())
    # One GET each: aggregator keys live in different cluster slots, and there are few.
    prefix = len(keys.aggregator_alive(""))
    return _records([n[prefix:] for n in names], [r.get(n) for n in names])
