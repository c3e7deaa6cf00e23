"""Secure aggregation end to end: the CLI's processes, real Redis, real training.

The committed model is checked against the survivors' plain inputs (which only the clients hold:
the test's clients record them, tests/support/secagg_client.py), computed here from first
principles; a reader of every key during the run finds none of those inputs in Redis.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from support.data import SEED_DATA_MISSING, seed_data_dir
from support.procs import ROOT, cli_env, fedq_cmd

from fedq.errors import CodecError
from fedq.protocol import codec, messages
from fedq.protocol.store import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.skipif(seed_data_dir() is None, reason=SEED_DATA_MISSING)]

RUN = ["--model", "mlp", "--local-epochs", "1", "--round-timeout", "300", "--secure-aggregation"]
CLIP, BITS = 8.0, 22  # the defaults of --secagg-clip and --secagg-bits


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _federation(redis_url: str, tmp_path: Path, run_id: str, clients: int, extra: list[str],
                drops: dict[int, int]) -> dict[str, subprocess.Popen]:
    """`fedq aggregator` creating the run, and recording clients (shard -> round it drops after)."""
    env = cli_env(redis_url)
    procs = {"aggregator": _start(fedq_cmd("aggregator", "--clients", str(clients), "--run-id", run_id, *RUN,
                                           *extra), env, tmp_path / "aggregator.log")}
    for k in range(clients):
        cmd = [sys.executable, str(ROOT / "tests" / "support" / "secagg_client.py"), "--shard", str(k),
               "--run", run_id, "--record", str(tmp_path), "--drop-after-push", str(drops.get(k, 0))]
        procs[f"client-{k}"] = _start(cmd, env, tmp_path / f"client-{k}.log")
    return procs


def _wait(procs: dict[str, subprocess.Popen], logs: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    for name, p in procs.items():
        try:
            p.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise AssertionError(f"{name} did not finish; log:\n{(logs / f'{name}.log').read_text()}") from None


class Reader(threading.Thread):
    """Reads every key of the Redis, of every type, in a loop until stopped; keeps each value seen."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.r = redis.Redis.from_url(url)
        self.seen: set[bytes] = set()
        self.keys: set[bytes] = set()
        self.updates: set[bytes] = set()  # the values of the clients' update keys
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
                    if b":update:" in key:
                        self.updates.update(values)
                except redis.ResponseError:
                    pass  # the key changed type or vanished between the calls
            time.sleep(0.05)


def _recorded(tmp_path: Path, round_no: int) -> dict[str, dict[str, np.ndarray]]:
    return {p.name.split("-r")[0]: dict(np.load(p)) for p in sorted(tmp_path.glob(f"*-r{round_no}.npz"))}


def _reference(inputs: list[np.ndarray], base: list[np.ndarray]) -> list[np.ndarray]:
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


def _assert_model(got: list[np.ndarray], inputs: list[np.ndarray], base: list[np.ndarray]) -> None:
    want = _reference(inputs, base)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-7)
    # The check can fail: the mean without any one survivor is far off.
    assert max(np.abs(g - w).max() for g, w in zip(got, _reference(inputs[1:], base))) > 1e-4


def test_fedq_run_with_secure_aggregation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(fedq_cmd("run", "--clients", "3", "--rounds", "2", *RUN, "--out", str(out)),
                          env=cli_env(None), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "finished" and [x["round"] for x in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        sa = row["strategy"]["secure_aggregation"]
        assert sa["survivors"] == sa["sharers"] == sa["roster"] == 3 and sa["dropped"] == []
        assert row["train_loss"] is None  # no client's own loss or accuracy travels in clear
        assert row["num_examples"] > 0  # the capped counts' sum, unmasked with the updates
    assert report["final"]["test_accuracy"] > 0.8


def test_central_dp_on_the_unmasked_sum(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(fedq_cmd("run", "--clients", "3", "--rounds", "1", *RUN, "--dp", "central", "--dp-clip", "1",
                                   "--dp-noise", "0.1", "--dp-delta", "1e-3", "--out", str(out)),
                          env=cli_env(None), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    row = json.loads((out / "report.json").read_text())["rounds"][0]
    assert row["strategy"]["secure_aggregation"]["survivors"] == 3
    assert row["num_examples"] == 3000  # each client sent its clipped delta at full weight
    assert row["dp_epsilon"] > 0


def test_exact_mean_with_a_dropout_and_nothing_in_clear(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    reader = Reader(redis_url)
    reader.start()
    # client-3 pushes its masked input of round 2 and vanishes before revealing anything.
    procs = _federation(redis_url, tmp_path, "sa-exact", 4, ["--rounds", "2"], {3: 2})
    _wait(procs, tmp_path)
    reader.done.set()
    reader.join(30)
    store = RunStore(r, "sa-exact")
    state = store.state()
    assert state["status"] == "finished", (state, (tmp_path / "aggregator.log").read_text()[-3000:])
    rounds = store.metrics()
    assert rounds[1]["strategy"]["secure_aggregation"]["survivors"] == 4  # its input is in the sum
    r1, r2 = _recorded(tmp_path, 1), _recorded(tmp_path, 2)
    assert sorted(r1) == sorted(r2) == [f"client-{k}" for k in range(4)]

    # Round 1's model is the base every client trained round 2 from; round 2's is committed.
    _, _, committed = messages.decode_global(store.global_payload(), "sa-exact")
    _assert_model(_tensors(r2, "b"), [v["x"] for v in r1.values()], _tensors(r1, "b"))
    _assert_model([np.asarray(t) for t in committed], [v["x"] for v in r2.values()], _tensors(r2, "b"))

    # Nothing any client trained, nor its plain input, was ever in Redis in clear.
    blob = b"\x00".join(reader.seen)
    # The reader did read the run: the masked updates and the shares were there while it ran.
    assert any(b":update:" in k for k in reader.keys) and any(b":secagg:2:shares" in k for k in reader.keys)
    for cid, rec in {**{f"{c}/1": v for c, v in r1.items()}, **{f"{c}/2": v for c, v in r2.items()}}.items():
        x = rec["x"].tobytes()
        for at in range(0, len(x) - 32, max(4, len(x) // 16)):
            assert x[at:at + 32] not in blob, f"{cid}'s plain input at byte {at} is in Redis"
        for name in (k for k in rec if k.startswith("w") and rec[k].size >= 8):
            w = rec[name].astype(np.float32).tobytes()
            assert w[:32] not in blob, f"{cid}'s trained {name} is in Redis"
    # What the updates carried looks uniform: each of the 32 bits of every value is set about half
    # the time (a plain input would have its top bits clear: its values are below 2^22).
    masked = [env.tensors[0] for env in _envelopes(reader.updates)]
    assert len(masked) >= 6 and all(m.dtype == np.uint32 for m in masked)
    values = np.concatenate(masked)
    ones = ((values[:, None] >> np.arange(32, dtype=np.uint32)) & 1).sum(axis=0)
    assert np.all(np.abs(ones - values.size / 2) < 5 * np.sqrt(values.size / 4)), ones
    # The commit deleted every secure-aggregation message of the rounds.
    assert not [k for k in r.scan_iter(match="*secagg*")]


def _envelopes(raws: set[bytes]) -> list[codec.Envelope]:
    """The update envelopes among the values read (a hash also holds its sequence number)."""
    out = []
    for raw in raws:
        try:
            out.append(codec.decode(raw, expect_kind=messages.KIND_UPDATE))
        except CodecError:
            continue
    return out


def _tensors(recorded: dict[str, dict[str, np.ndarray]], prefix: str) -> list[np.ndarray]:
    """The tensors ``<prefix>0, <prefix>1, ...`` of the round's records; for the base, every client's agree."""
    first = next(iter(recorded.values()))
    out = [first[f"{prefix}{i}"] for i in range(sum(k.startswith(prefix) for k in first))]
    if prefix == "b":
        for rec in recorded.values():
            assert all(np.array_equal(rec[f"b{i}"], t) for i, t in enumerate(out))
    return out


def test_round_fails_beyond_the_dropouts_it_tolerates(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    # 4 clients, each sharing with all 3 others, threshold 3: two drop after their masked input,
    # so only 2 survivors reveal shares, fewer than the 3 that rebuild anyone's self mask.
    procs = _federation(redis_url, tmp_path, "sa-fail", 4,
                        ["--rounds", "1", "--secagg-neighbours", "3", "--secagg-threshold", "3"], {2: 1, 3: 1})
    _wait(procs, tmp_path)
    state = RunStore(r, "sa-fail").state()
    assert state["status"] == "failed", state
    assert "too_few_shares" in state["reason"], state["reason"]
    assert RunStore(r, "sa-fail").committed_round() == 0  # no model was committed
