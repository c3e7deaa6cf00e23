"""Secure-aggregation runs of real processes and their checks: `fedq aggregator` with recording clients
(tests/support/secagg_client.py), a reader of every Redis key, the committed model computed from the
survivors' recorded plain inputs, and masked updates that look uniform."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import redis

from fedq.errors import CodecError
from fedq.protocol import codec, messages
from support.fake_client import fake_client_cmd, fake_client_env
from support.procs import ROOT, cli_env, fedq_cmd

RUN = ["--model", "mlp", "--local-epochs", "1", "--round-timeout", "300", "--secure-aggregation"]
CLIP, BITS = 8.0, 22  # the defaults of --secagg-clip and --secagg-bits


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # a test may kill an aggregator with its work horse


def federation(redis_url: str, tmp_path: Path, run_id: str, clients: int, extra: list[str],
               drops: dict[int, int], client_args: dict[int, list[str]] | None = None, *,
               client_env: dict[int, dict[str, str]] | None = None, prestored: bool = False,
               **env_extra: str) -> dict[str, subprocess.Popen]:
    """`fedq aggregator` creating the run, and recording clients (shard -> round it drops after;
    shard -> more of tests/support/secagg_client.py's options; shard -> FEDQ_* settings of its
    own); ``env_extra``: everyone's FEDQ_* settings. ``prestored`` (a run without central
    evaluation): the aggregator is support.fake_client's, whose run comes with support.initial's
    model rather than one built in a TensorFlow child."""
    env = cli_env(redis_url, **env_extra)
    args = ("aggregator", "--clients", str(clients), "--run-id", run_id, *RUN, *extra)
    cmd, agg_env = (fake_client_cmd(*args), fake_client_env(env)) if prestored else (fedq_cmd(*args), env)
    procs = {"aggregator": start(cmd, agg_env, tmp_path / "aggregator.log")}
    for k in range(clients):
        cmd = [sys.executable, str(ROOT / "tests" / "support" / "secagg_client.py"), "--shard", str(k),
               "--run", run_id, "--record", str(tmp_path), "--drop-after-push", str(drops.get(k, 0)),
               *(client_args or {}).get(k, [])]
        procs[f"client-{k}"] = start(cmd, {**env, **(client_env or {}).get(k, {})}, tmp_path / f"client-{k}.log")
    return procs


def wait_all(procs: dict[str, subprocess.Popen], logs: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    for name, p in procs.items():
        try:
            p.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise AssertionError(f"{name} did not finish; log:\n{(logs / f'{name}.log').read_text()}") from None


# Where an update's bytes are while a round runs: the client's staged and body keys, the update
# hash (its sequence number), and the aggregator's taken copy.
UPDATE_KEYS = (b":update:", b":body:", b":staged", b":taken:")


class Reader(threading.Thread):
    """Reads every key of the Redis, of every type, in a loop until stopped; keeps each value seen."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.r = redis.Redis.from_url(url)
        self.seen: set[bytes] = set()
        self.keys: set[bytes] = set()
        self.updates: set[bytes] = set()  # the values of the update keys (UPDATE_KEYS)
        self.done = threading.Event()

    def _values(self, key: bytes) -> list[bytes]:
        kind = self.r.type(key).decode()
        if kind == "string":
            return [self.r.get(key) or b""]
        if kind == "hash":
            return list(self.r.hgetall(key).values())
        if kind == "list":
            return list(self.r.lrange(key, 0, -1))
        if kind == "set":
            return list(self.r.smembers(key))
        if kind == "zset":
            return list(self.r.zrange(key, 0, -1))
        if kind == "stream":
            return [v for _, fields in self.r.xrange(key) for v in fields.values()]
        return []

    def run(self) -> None:
        while not self.done.is_set():
            for key in self.r.scan_iter(count=1000):
                self.keys.add(key)
                try:
                    values = self._values(key)
                    self.seen.update(values)
                    if any(tag in key for tag in UPDATE_KEYS):
                        self.updates.update(values)
                except redis.ResponseError:
                    pass  # the key changed type or vanished between the calls
            time.sleep(0.05)


def recorded(tmp_path: Path, round_no: int) -> dict[str, dict[str, np.ndarray]]:
    return {p.name.split("-r")[0]: dict(np.load(p)) for p in sorted(tmp_path.glob(f"*-r{round_no}.npz"))}


def reference(inputs: list[np.ndarray], base: list[np.ndarray]) -> list[np.ndarray]:
    """The next global model from the survivors' plain inputs, from the definition of the fixed point:
    v = round((x + c) s), s = (2^bits - 1) / 2c; the last coordinate is the weight w, the others w x."""
    s = (2 ** BITS - 1) / (2 * CLIP)
    total = np.sum([x.astype(np.uint64) for x in inputs], axis=0)
    values = total.astype(np.float64) / s - len(inputs) * CLIP
    mean = values[:-1] / values[-1]
    out, at = [], 0
    for b in base:
        out.append((b.astype(np.float64) + mean[at:at + b.size].reshape(b.shape)).astype(np.float32))
        at += b.size
    return out


def assert_model(got: list[np.ndarray], inputs: list[np.ndarray], base: list[np.ndarray]) -> None:
    want = reference(inputs, base)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-7)
    # The check can fail: the mean without any one survivor is far off.
    assert max(np.abs(g - w).max() for g, w in zip(got, reference(inputs[1:], base))) > 1e-4


def envelopes(raws: set[bytes]) -> list[codec.Envelope]:
    """The update envelopes among the values read (a hash also holds its sequence number)."""
    out = []
    for raw in raws:
        try:
            out.append(codec.decode(raw, expect_kind=messages.KIND_UPDATE))
        except CodecError:
            continue
    return out


def tensors(recorded: dict[str, dict[str, np.ndarray]], prefix: str) -> list[np.ndarray]:
    """The tensors ``<prefix>0, <prefix>1, ...`` of the round's records; for the base, every client's agree."""
    first = next(iter(recorded.values()))
    out = [first[f"{prefix}{i}"] for i in range(sum(k.startswith(prefix) for k in first))]
    if prefix == "b":
        for rec in recorded.values():
            assert all(np.array_equal(rec[f"b{i}"], t) for i, t in enumerate(out))
    return out


def assert_nothing_in_clear(reader: Reader, recorded: dict[str, dict[str, np.ndarray]]) -> None:
    """No recorded plain input nor trained weights is among the values the reader saw; the updates it
    saw look uniform (each of the 32 bits set about half the time: a plain input's top bits are clear)."""
    blob = b"\x00".join(reader.seen)
    for cid, rec in recorded.items():
        x = rec["x"].tobytes()
        for at in range(0, len(x) - 32, max(4, len(x) // 16)):
            assert x[at:at + 32] not in blob, f"{cid}'s plain input at byte {at} is in Redis"
        for name in (k for k in rec if k.startswith("w") and rec[k].size >= 8):
            w = rec[name].astype(np.float32).tobytes()
            assert w[:32] not in blob, f"{cid}'s trained {name} is in Redis"
    masked = [env.tensors[0] for env in envelopes(reader.updates)]
    assert masked and all(m.dtype == np.uint32 for m in masked)
    values = np.concatenate(masked)
    ones = ((values[:, None] >> np.arange(32, dtype=np.uint32)) & 1).sum(axis=0)
    assert np.all(np.abs(ones - values.size / 2) < 5 * np.sqrt(values.size / 4)), ones
