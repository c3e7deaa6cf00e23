"""Reads of client-writable keys (fedq.protocol.guarded, the store's update guard) and capped weights."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from fedq.learning.aggregate import capped_weights
from fedq.learning.spec import RunSpec
from fedq.protocol import guarded
from fedq.protocol.store import RunStore, list_runs

TYPES = {
    "string": lambda r, k: r.set(k, "v"),
    "list": lambda r, k: r.rpush(k, "v"),
    "set": lambda r, k: r.sadd(k, "v"),
    "zset": lambda r, k: r.zadd(k, {"v": 1}),
    "hash": lambda r, k: r.hset(k, "f", "v"),
    "stream": lambda r, k: r.xadd(k, {"f": "v"}),
}


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_each_reader_takes_its_own_type_and_reads_anything_else_as_absent(r: redis.Redis, kind: str) -> None:
    TYPES[kind](r, "k")
    assert (guarded.strings(r, ["k"]) == [b"v"]) == (kind == "string")
    assert (guarded.lists(r, ["k"]) == [[b"v"]]) == (kind == "list")
    assert (guarded.hash_fields(r, ["k"], ["f"]) == [[b"v"]]) == (kind == "hash")
    got = guarded.streams(r, ["k"])
    assert (len(got[0]) == 1) == (kind == "stream")


def test_values_over_the_cap_are_not_read(r: redis.Redis) -> None:
    r.set("big", b"x" * 5000)
    r.set("small", b"y" * 10)
    assert guarded.strings(r, ["big", "small", "absent"], cap=1000) == [None, b"y" * 10, None]
    r.rpush("biglist", b"x" * 100_000)
    r.hset("bighash", "f", b"x" * 100_000)
    assert guarded.lists(r, ["biglist"], cap=10_000) == [[]]
    assert guarded.hash_fields(r, ["bighash"], ["f"], cap=10_000) == [[None]]


def test_capped_weights_meet_the_cap_and_leave_the_rest() -> None:
    assert capped_weights({"a": 100, "b": 300}, 1.0) == {"a": 100, "b": 300}
    w = capped_weights({"a": 100, "b": 300, "m": 10 ** 9}, 0.5)
    assert w == {"a": 100, "b": 300, "m": 400}
    w = capped_weights({"a": 1, "b": 1, "c": 1, "d": 1000, "e": 1000}, 0.3)
    assert max(w.values()) / sum(w.values()) <= 0.3 + 1e-9
    assert (w["a"], w["b"], w["c"]) == (1, 1, 1)
    # A cap no weighting can meet (0.2 of 3 models): the smallest possible share, equal weights.
    assert capped_weights({"a": 5, "b": 7, "c": 9}, 0.2) == {"a": 5, "b": 5, "c": 5}
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = {f"c{i}": int(x) for i, x in enumerate(rng.integers(1, 10 ** 6, rng.integers(2, 12)))}
        share = float(rng.uniform(1 / len(counts), 1))
        w = capped_weights(counts, share)
        assert max(w.values()) <= share * sum(w.values()) + 1e-9
        assert all(w[k] == counts[k] or w[k] == max(w.values()) for k in counts)  # only the largest lowered
    with pytest.raises(ValueError):
        capped_weights({"a": 1}, 0)


def test_max_client_share_is_validated() -> None:
    from fedq.errors import ConfigError

    assert RunSpec(max_client_share=0.5).validate().max_client_share == 0.5
    for bad in (0, 1.5, True, "0.5"):
        with pytest.raises(ConfigError, match="max client share"):
            RunSpec(max_client_share=bad).validate()


def test_the_update_guard_checks_type_sequence_and_size_in_redis(r: redis.Redis) -> None:
    store = RunStore(r, "guard")
    key = store.k.update("c0", 1)
    assert store.read_update(1, "c0", "", 100).kind == "none"
    r.set(key, "x")
    got = (store.read_update(1, "c0", "", 100).kind, store.update_seqs(1, ["c0"]))
    assert got == ("wrong_type", {"c0": "!wrong_type"})
    r.delete(key)
    body, taken = store.k.update_body("c0", 1), store.k.update_taken("c0", 1)
    r.set(body, b"p")
    for seq in ("abc", "-1", "1" * 20):
        r.hset(key, mapping={"seq": seq})
        assert store.read_update(1, "c0", "", 100).kind == "bad_seq"
    r.hset(key, mapping={"seq": "3"})
    r.set(body, b"p" * 1000)
    got = store.read_update(1, "c0", "", 100)
    assert (got.kind, got.seq, got.size, got.payload) == ("too_large", "3", 1000, None)
    assert store.read_update(1, "c0", "3", 100).kind == "seen"  # judged: nothing travels
    r.delete(body)
    r.hset(body, "x", "y")  # the body itself of another type
    assert store.read_update(1, "c0", "", 100).kind == "no_body"
    r.delete(body)
    assert store.read_update(1, "c0", "", 100).kind == "no_body"  # a sequence number with nothing behind it
    r.set(body, b"ok")
    got = store.read_update(1, "c0", "", 100)
    assert (got.kind, got.seq, got.payload) == ("ok", "3", b"ok")
    # Taken: out of the client's reach, so a rewrite of its body cannot change the version judged.
    assert not r.exists(body) and r.get(taken) == b"ok"
    r.set(body, b"rewritten behind the guard's back")
    assert store.read_update(1, "c0", "", 100).payload == b"ok"  # a rebuild re-reads what was judged
    assert store.read_update(1, "bad id!", "", 100).kind == "none"


def test_the_guard_and_the_cheap_look_name_a_version_alike(r: redis.Redis) -> None:
    """A rescan compares update_seqs with the version judged: they must agree, or every idle
    moment would send the guard to the same bad key again."""
    store = RunStore(r, "alike")
    key = store.k.update("c0", 1)
    body = store.k.update_body("c0", 1)
    for write in (lambda: r.set(key, "x"), lambda: r.hset(key, mapping={"seq": "abc"}),
                  lambda: (r.hset(key, mapping={"seq": "7"}), r.set(body, b"p" * 1000)),
                  lambda: r.hset(key, mapping={"seq": "9"}),  # no body
                  lambda: (r.hset(key, mapping={"seq": "8"}), r.set(body, b"ok"))):
        r.delete(key, body)
        write()
        assert store.read_update(1, "c0", "", 100).version == store.update_seqs(1, ["c0"])["c0"]


def test_wake_ups_are_drained_deduplicated_and_filtered_in_redis(r: redis.Redis) -> None:
    store = RunStore(r, "drain")
    r.rpush(store.k.inbox, *(["c0", "c1"] * 5000), "x" * 100, "c2")
    assert store.pop_inbox(0.1) == ["c0", "c1"]  # 10,000 entries a call: one reply of two ids
    assert store.pop_inbox(0.1) == ["c2"]  # the 100-byte entry never left Redis
    assert store.pop_inbox(0.1) == []


def test_run_index_entries_that_are_no_run_ids_are_skipped(r: redis.Redis) -> None:
    RunStore(r, "good-run").create(RunSpec(run_id="good-run"))
    r.zadd("fedq:runs", {"<script>": 1, "a:b": 2, "": 3})
    assert list_runs(r) == ["good-run"]


def test_an_oversized_string_costs_a_few_bytes_however_often_it_is_read(redis_url: str) -> None:
    """guarded.strings asks the size first: a member's 4 MiB heartbeat, looked at every half
    second near a deadline, must not cost the cap (1 MiB) each time."""
    received = [0]

    class Counting(redis.Connection):
        def read_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            reply = super().read_response(*args, **kwargs)
            received[0] += len(reply) if isinstance(reply, bytes) else 0
            return reply

    r = redis.Redis(connection_pool=redis.ConnectionPool.from_url(redis_url, connection_class=Counting))
    r.set("guard:huge", b"x" * (4 << 20))
    r.set("guard:small", b"ok")
    r.hset("guard:hash", "f", "v")
    names = ["guard:huge", "guard:small", "guard:hash", "guard:absent"]
    for _ in range(20):
        assert guarded.strings(r, names) == [None, b"ok", None, None]
    assert received[0] < 1000  # twenty looks: the small value's bytes and the replies' small change
    r.delete("guard:huge", "guard:small", "guard:hash")
