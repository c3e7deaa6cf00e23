"""A run under attack: a Redis with fedq's ACL file, an aggregator, two honest clients and Mallory.

The aggregator runs in-process (as the ``fedq-aggregator`` ACL user) on connections that count
every byte Redis sends it. The honest clients ``site-a`` and ``site-b`` are TensorFlow-free:
they join with real feature statistics, read each round's global model and push it plus
seeded noise, remembering what they pushed and what they read. Mallory connects as her own
client user, exactly as a compromised site would, and does whatever a scenario says.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
from support.redis import RedisServer
from support.wait import wait_until

from fedq.learning.partition import load_shard
from fedq.learning.scaling import feature_stats
from fedq.learning.spec import RunSpec
from fedq.ops import acl
from fedq.protocol import messages, transfer
from fedq.protocol.signing import Signer
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import ENDED
from fedq.roles.aggregator import Aggregator, AggregatorStopped
from fedq.settings import Settings

HONEST = {"site-a": 100, "site-b": 300}  # sample counts, unequal on purpose
MALLORY = "mallory"
CONFINED = "mallory-confined"  # a client user confined to another run (fedq acl --run elsewhere)
USERS = [*HONEST, MALLORY]
MODEL = "byo_models:build_wide"  # about 1.2 MB of float32 weights: reads are measurable
TABLE = "adversarial suite"  # one row per attack (support.table), printed at the end of the session
COLUMNS = [("attack", "attack", -34, ""), ("outcome", "outcome", -30, ""), ("run", "run", -9, ""),
           ("honest lost", "lost", 11, ""), ("mallory accepted", "accepted", 16, ""),
           ("read MB", "read_mb", 8, ".2f"), ("bound MB", "bound_mb", 8, ".2f")]


class _CountingSocket:
    """A socket whose received bytes are added to a counter (everything else passes through)."""

    def __init__(self, sock: socket.socket, counter: list[int]) -> None:
        self._sock = sock
        self._counter = counter

    def recv(self, *args: Any) -> bytes:
        data = self._sock.recv(*args)
        self._counter[0] += len(data)
        return data

    def recv_into(self, buf: Any, *args: Any) -> int:
        n = self._sock.recv_into(buf, *args)
        self._counter[0] += n
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def counting_redis(url: str, counter: list[int]) -> redis.Redis:
    """A Redis client whose connections count the bytes they receive into counter[0]."""

    class Counting(redis.Connection):
        def _connect(self) -> Any:
            return _CountingSocket(super()._connect(), counter)

    pool = redis.ConnectionPool.from_url(url, connection_class=Counting, socket_timeout=30)
    return redis.Redis(connection_pool=pool)


@dataclass
class Honest:
    """What one honest client pushed and read, round by round."""

    cid: str
    n: int
    pushed: dict[int, list[np.ndarray]] = field(default_factory=dict)
    seen: dict[int, list[np.ndarray]] = field(default_factory=dict)  # global model each round started from
    error: BaseException | None = None


class Arena:
    """One Redis with the ACL users of a federation (site-a, site-b, mallory); runs on demand."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.users = {u.name: u for u in acl.users(USERS)}
        self.users[CONFINED] = acl.User(CONFINED, "confined-" + "x" * 24,
                                        acl.client_rules(CONFINED, run_id="elsewhere"))
        (tmp / "users.acl").write_text(acl.aclfile(self.users.values()))
        self.server = RedisServer("--aclfile", str(tmp / "users.acl"), ping=False)
        self.agg = self.connect(acl.AGGREGATOR_USER)

        def up() -> bool:
            assert self.server.proc.poll() is None, "redis-server exited"
            return bool(self.agg.ping())

        wait_until(up, "the ACL redis-server to answer", 15, ignore=(redis.ConnectionError,))

    def url(self, user: str) -> str:
        return self.users[user].url("127.0.0.1", self.server.port)

    def connect(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user), socket_timeout=30)

    def close(self) -> None:
        self.server.stop()


class Run:
    """One run: created, driven by an in-process aggregator, two honest clients pushing."""

    def __init__(self, arena: Arena, run_id: str, *, clients: int = 3, rounds: int = 2, round_timeout: float = 3,
                 spec_extra: dict[str, Any] | None = None, signers: dict[str, Signer] | None = None,
                 **settings: Any) -> None:
        """round_timeout: a round Mallory does not push to closes then with the honest two; a
        scenario whose attack takes a while in the first round (large writes, many pushes) sets more."""
        self.arena = arena
        self.run_id = run_id
        extra = {"min_clients": 2, **(spec_extra or {})}  # buffered runs take no quorum (min_clients None)
        self.spec = RunSpec(clients=clients, rounds=rounds, round_timeout=round_timeout, round_retries=1,
                            run_id=run_id, model=MODEL, local_epochs=1, **extra).validate()
        self.store = RunStore(arena.agg, run_id)
        self.store.create(self.spec)
        self.signers = signers or {}
        self.bytes_read = [0]
        self.settings = Settings.from_env(env={}, redis_url=arena.url(acl.AGGREGATOR_USER), block_seconds=0.2,
                                          max_update_bytes=4 << 20, **settings)
        self.aggregator = Aggregator(counting_redis(self.settings.redis_url, self.bytes_read), self.settings, run_id)
        self.result: dict[str, Any] | None = None
        self.crash: BaseException | None = None
        self.honest = {cid: Honest(cid, n) for cid, n in HONEST.items()}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._drive, daemon=True)]
        self.threads += [threading.Thread(target=self._client, args=(h, k), daemon=True)
                         for k, h in enumerate(self.honest.values())]
        for t in self.threads:
            t.start()
        self.mallory = arena.connect(MALLORY)
        self.m = RunStore(self.mallory, run_id)

    # --- the roles ------------------------------------------------------------------------
    def _drive(self) -> None:
        try:
            self.result = self.aggregator.run()
        except AggregatorStopped:
            pass
        except BaseException as exc:  # the test reports it
            self.crash = exc

    def _client(self, h: Honest, shard: int) -> None:
        try:
            st = RunStore(self.arena.connect(h.cid), self.run_id)
            x, _ = load_shard(self.spec.data, shard, 2)
            outcome = st.join_and_wait(h.cid, {"shard": shard, "num_shards": 2, "own_data": True, "rows": 10_000},
                                       feature_stats(x).to_dict(), timeout=60)
            assert outcome == "joined", f"{h.cid} could not join: {outcome}"
            rng = np.random.default_rng(shard)
            last = "0-0"
            while not self.stop.is_set():
                state = st.state()
                if state.get("status") in ENDED:
                    return
                committed = int(state.get("round") or 0)
                nxt = committed + 1
                if state.get("phase") == "train" and nxt not in h.pushed:
                    _, names, g = transfer.read_global(st)
                    h.seen[nxt] = g
                    mine = [(t + rng.normal(0, 0.05, t.shape)).astype(t.dtype) for t in g]
                    signer = self.signers.get(h.cid)
                    sig = None if signer is None else signer.sign(self.run_id, nxt, h.cid, h.n, names, mine)
                    payload = messages.encode_update(self.run_id, nxt, h.cid, h.n, {"loss": 0.5, "accuracy": 0.8},
                                                     names, mine, sig)
                    outcome = st.push_update(h.cid, nxt, payload, self.settings.max_update_bytes)
                    assert outcome == "ok", f"{h.cid} round {nxt}: {outcome}"
                    h.pushed[nxt] = mine
                    continue
                last, _ = st.wait_event(last, 0.2)
        except BaseException as exc:  # the test reports it
            h.error = exc

    # --- Mallory's tools --------------------------------------------------------------------
    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
        def done() -> bool:
            assert self.crash is None, f"the aggregator crashed: {self.crash!r}"
            return cond()

        wait_until(done, what, timeout, every=0.02)

    def training(self) -> bool:
        return self.store.state().get("phase") in ("train", "done")

    def mallory_joins(self, rows: int = 50) -> str:
        x, _ = load_shard(self.spec.data, 0, 2)
        return self.m.join_and_wait(MALLORY, {"shard": 0, "rows": rows}, feature_stats(x).to_dict(), timeout=60)

    def global_now(self) -> tuple[int, list[str], list[np.ndarray]]:
        return transfer.read_global(self.m)

    def mallory_update(self, round_no: int, n: int, scale: float = 1.0,
                       signer: Signer | None = None) -> tuple[bytes, list[np.ndarray]]:
        """A well-formed update of Mallory's (the global model times scale) and its tensors."""
        _, names, g = self.global_now()
        mine = [(t * scale + 0.5).astype(t.dtype) for t in g]
        sig = None if signer is None else signer.sign(self.run_id, round_no, MALLORY, n, names, mine)
        return messages.encode_update(self.run_id, round_no, MALLORY, n, {"loss": 0.1}, names, mine, sig), mine

    # --- the end ----------------------------------------------------------------------------
    def finish(self, timeout: float = 120) -> dict[str, str]:
        self.wait(lambda: self.store.state().get("status") in ENDED, "the run to end", timeout)
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        assert self.crash is None, f"the aggregator crashed: {self.crash!r}"
        for h in self.honest.values():
            assert h.error is None, f"{h.cid}: {h.error!r}"
        return self.store.state()
