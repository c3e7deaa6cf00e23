"""One federation harness: a run on a real Redis with its aggregator(s) as in-process threads and
clients c0..cN-1 that join by hand and push updates directly (no training), so a test controls
exactly what each round receives and can check what it commits."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from fedq.learning.partition import load_shard
from fedq.learning.scaling import feature_stats
from fedq.learning.spec import RunSpec
from fedq.protocol import chunking, codec, messages, transfer
from fedq.protocol.connection import connect
from fedq.protocol.store import RunStore
from fedq.roles.aggregator import Aggregator, AggregatorStopped
from fedq.settings import Settings
from support.fake_client import fake_client_cmd, fake_client_env
from support.procs import Proc, cli_env
from support.wait import wait_until

__all__ = ["CliFederation", "Federation", "noisy", "wait_committed"]


def noisy(tensors: list[np.ndarray], seed: int, scale: float = 0.1) -> list[np.ndarray]:
    """tensors plus Gaussian noise (seeded), in their own dtypes: a plausible client update."""
    rng = np.random.default_rng(seed)
    return [(t + rng.normal(0, scale, t.shape)).astype(t.dtype) for t in tensors]


def wait_committed(store: RunStore, round_no: int, timeout: float = 60) -> None:
    """Wait until round_no is committed; fail with the run's reason if the run failed instead."""
    wait_until(lambda: store.committed_round() >= round_no or store.state().get("status") == "failed",
               f"round {round_no} of {store.run_id} to commit", timeout)
    assert store.state().get("status") != "failed", store.state().get("reason")


class Federation:
    """A run with in-process aggregator threads; clients c0..c{clients-1} joined by hand.

    ``settings`` override fedq's Settings (e.g. chunk_bytes, lease_seconds, client_keys); the
    aggregator blocks 0.2 s at a time so a stop is quick. With ``join=False`` nobody joins
    (a run refused before training). With ``state_rows`` each client states its shard's row
    count (and 5 validation rows) when joining, so the aggregator checks sample counts against
    it; without, clients may claim any count."""

    def __init__(self, r: redis.Redis, redis_url: str, spec: RunSpec, *, join: bool = True,
                 state_rows: bool = True, **settings: Any) -> None:
        self.settings = Settings.from_env(env={}, redis_url=redis_url, **{"block_seconds": 0.2, **settings})
        self.spec = spec.validate()
        self.store = RunStore(r, self.spec.run_id)
        self.store.create(self.spec)
        self.aggs: list[Aggregator] = []
        self.threads: list[threading.Thread] = []
        self.result: dict | None = None
        self.start_aggregator()
        if join:
            for k in range(self.spec.clients):
                x, _ = load_shard(self.spec.data, k, self.spec.clients)
                rec = {"shard": k, "rows": len(x), "val_rows": 5} if state_rows else {"shard": k}
                assert self.store.join_and_wait(f"c{k}", rec, feature_stats(x).to_dict()) == "joined"
            wait_until(lambda: self.store.state().get("phase") == "train", "training to open")

    # --- the aggregator ---------------------------------------------------------------------
    @property
    def agg(self) -> Aggregator:
        return self.aggs[-1]

    @property
    def thread(self) -> threading.Thread:
        return self.threads[-1]

    def start_aggregator(self) -> Aggregator:
        """Start another driver (a takeover after stop_aggregator) in a thread of its own."""
        agg = Aggregator(connect(self.settings), self.settings, self.spec.run_id)

        def drive() -> None:
            try:
                self.result = agg.run()
            except AggregatorStopped:
                pass  # the test ended before the run did

        t = threading.Thread(target=drive, daemon=True)
        t.start()
        self.aggs.append(agg)
        self.threads.append(t)
        return agg

    def stop_aggregator(self) -> None:
        self.agg.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()

    # --- the clients' side -------------------------------------------------------------------
    def global_model(self) -> tuple[int, list[str], list[np.ndarray]]:
        """(round, names, tensors) of the current global model."""
        return messages.decode_global(self.store.global_payload(), self.spec.run_id)

    def update(self, cid: str, round_no: int, n: int, tensors: list[np.ndarray], names: list[str],
               signature: bytes | None = None, **meta_over: Any) -> bytes:
        """An update's bytes as a client makes them; meta_over rewrites envelope fields (lies)."""
        payload = messages.encode_update(self.spec.run_id, round_no, cid, n, {"loss": 0.5, "accuracy": 0.8},
                                         names, tensors, signature)
        if not meta_over:
            return payload
        env = codec.decode(payload)
        return codec.encode("update", env.tensors, meta={**env.meta, **meta_over}, names=env.names)

    def push(self, cid: str, round_no: int, payload: bytes) -> str:
        """Push raw update bytes; the store's answer ("ok" or a refusal reason)."""
        return self.store.push_update(cid, round_no, payload, self.settings.max_update_bytes)

    def push_tensors(self, cid: str, round_no: int, tensors: list[np.ndarray], n: int, **metrics: float) -> str:
        """Push an honest update of these tensors over n examples, with extra metrics."""
        _, names, _ = self.global_model()
        payload = messages.encode_update(self.spec.run_id, round_no, cid, n,
                                         {"loss": 0.5, "accuracy": 0.8, **metrics}, names, tensors)
        return self.store.push_update(cid, round_no, payload, self.settings.max_update_bytes)

    def push_parts(self, cid: str, n: int, names: list[str], tensors: list[np.ndarray], signer: Any = None,
                   round_no: int = 1) -> transfer.Pushed:
        """Push an update in parts of the run's chunk_bytes, as a client does (transfer.push_update)."""
        return transfer.push_update(self.store, cid, round_no, n, {"loss": 0.5}, names, tensors,
                                    chunk_bytes=self.settings.chunk_bytes, max_bytes=self.settings.max_update_bytes,
                                    signer=signer)

    def push_damaged_parts(self, cid: str, n: int, names: list[str], tensors: list[np.ndarray], damage: str,
                           round_no: int = 1) -> None:
        """What transfer.push_update does, with part 1 "tampered", "oversized" or "missing" before
        the head goes."""
        size = self.settings.chunk_bytes
        parts = list(chunking.encode_parts(tensors, size))
        layout = chunking.layout_of(tensors, size, [d for _, d in parts])
        for index, (payload, _) in enumerate(parts):
            if index == 1 and damage == "missing":
                continue
            bad = {"tampered": b"not the part", "oversized": payload + b"\0" * (1 << 20)}.get(damage)
            self.store.put_part(self.store.k.update_part(cid, round_no, "feedbeef", index),
                                bad if index == 1 and bad else payload)
        head = messages.encode_update_head(self.store.run_id, round_no, cid, n, {}, names,
                                           [t.shape for t in tensors], layout, "feedbeef")
        pushed = self.store.push_update(cid, round_no, head, self.settings.max_update_bytes, part_id="feedbeef")
        assert pushed == "ok", pushed

    # --- waiting and ending ---------------------------------------------------------------------
    def wait_round(self, round_no: int, timeout: float = 60) -> None:
        wait_committed(self.store, round_no, timeout)

    def wait_status(self, status: str, timeout: float = 60) -> None:
        wait_until(lambda: self.store.state().get("status") == status, f"{self.spec.run_id} to be {status}",
                   timeout)

    def close(self) -> None:
        for agg in self.aggs:
            agg.stop.set()
        for t in self.threads:
            t.join(timeout=30)


class CliFederation:
    """Aggregators and clients as `fedq` CLI processes (``support.procs.Proc``, each in a session
    of its own, logs in ``logs``), the way users start them. With ``fake_training`` the clients
    are ``support.fake_client`` processes: fedq's CLI with FakeTrainer for Keras."""

    def __init__(self, env: dict[str, str], logs: Path, *, fake_training: bool = False) -> None:
        self.env = env
        self.logs = logs
        self.fake_training = fake_training
        self.procs: dict[str, Proc] = {}

    @classmethod
    def driven(cls, redis_url: str, logs: Path, run_id: str, clients: int = 2, rounds: int = 3,
               local_epochs: int = 1, extra: tuple[str, ...] = (), *,
               train_seconds: float | None = None) -> CliFederation:
        """One run that `fedq aggregator --clients ...` creates and drives, with its --once clients;
        with train_seconds, clients train with FakeTrainer for that long x (shard + 1) a round."""
        env = cli_env(redis_url, FEDQ_TF_THREADS="1")  # the tests share 2 cores
        if train_seconds is not None:
            env = fake_client_env(env, train_seconds)
        fed = cls(env, logs, fake_training=train_seconds is not None)
        for k in range(clients):
            fed.client(k, run_id)
        fed.start("aggregator", "aggregator", "--clients", str(clients), "--rounds", str(rounds),
                  "--local-epochs", str(local_epochs), "--run-id", run_id, *extra)
        return fed

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        self.procs[name] = Proc(name, list(args), env or self.env, self.logs)
        return self.procs[name]

    def client(self, k: int, run_id: str, name: str | None = None, env: dict[str, str] | None = None) -> Proc:
        args = ("client", "--shard", str(k), "--run", run_id, "--once")
        if not self.fake_training:
            return self.start(name or f"client-{k}", *args, env=env)
        name = name or f"client-{k}"
        self.procs[name] = Proc(name, fake_client_cmd(*args), fake_client_env(env or self.env), self.logs, raw=True)
        return self.procs[name]

    def log(self, name: str) -> str:
        return self.procs[name].text()

    def logs_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {n}\n{p.text()[-chars:]}" for n, p in self.procs.items())

    def wait_exit(self, timeout: float = 240) -> None:
        """Every process exits 0 within timeout seconds (all together)."""
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            code = p.wait(max(1.0, deadline - time.monotonic()))
            assert code == 0, f"{p.name} exited {code}; log:\n{p.text()[-3000:]}"

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()
