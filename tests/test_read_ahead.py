"""Updates read many to a round trip (Judging._consider_all) are judged exactly as one by one.

Each scenario is judged twice against a real Redis, in two runs alike: by _consider_all (one read
for the batch) and by _consider for each client (one read each). The audit trail, the refusals
and the sum must come out the same, each version judged once, and pushes landing between the
batch's read and its judging are judged when their own wake-up comes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis

from fedq.learning.strategies import Strategy, StrategySpec
from fedq.protocol import messages
from fedq.protocol.store import RunStore
from fedq.protocol.update_reads import StoredUpdate
from fedq.roles.judging import READ_AHEAD_BYTES, Judging, Round
from fedq.settings import Settings

GLOBAL = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
NAMES = ["w", "b"]
IDS = ["a", "b", "c", "d", "e"]


class _Spec:
    """What RunStore.create needs of a run spec."""

    rounds, clients = 1, len(IDS)

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": 1, "clients": len(IDS)}


class _Store(RunStore):
    """A RunStore that counts its reads (one client's, many clients') and, when armed, runs a
    step right after its next read of many (a client's push landing just after the batch read)."""

    def __init__(self, r: redis.Redis, run_id: str) -> None:
        super().__init__(r, run_id)
        self.single_reads = 0
        self.batch_reads = 0
        self.after_batch: Callable[[], None] | None = None

    def read_update(self, round_no: int, client_id: str, judged: str, max_bytes: int,
                    only: str = "") -> StoredUpdate:
        self.single_reads += 1
        return super().read_update(round_no, client_id, judged, max_bytes, only)

    def read_updates(self, round_no: int, asks: Any, max_bytes: int) -> dict[str, StoredUpdate]:
        self.batch_reads += 1
        got = super().read_updates(round_no, asks, max_bytes)
        step, self.after_batch = self.after_batch, None
        if step is not None:
            step()
        return got


class _Judge(Judging):
    def __init__(self, store: RunStore, run_id: str, **settings: Any) -> None:
        self.run_id, self.store, self.verifier = run_id, store, None
        self.settings = Settings.from_env(env={}, **settings)

    def _tick(self) -> None:
        pass


def _setup(r: redis.Redis, run_id: str, **settings: Any) -> tuple[_Store, _Judge, Round]:
    """A run in training with IDS as members and the aggregator's judging of round 1."""
    store = _Store(r, run_id)
    store.create(_Spec())
    assert store.acquire_lease("driver", 30)
    for cid in IDS:
        assert store.join(cid, {"shard": 0}, {"count": [1]}) == "requested" and store.admit(cid)
    assert store.open_training(b"scaler", messages.encode_global(run_id, 0, NAMES, GLOBAL))
    acc = Strategy(StrategySpec(), GLOBAL)
    acc.begin_round(GLOBAL)
    template = messages.template_of(NAMES, GLOBAL)
    return store, _Judge(store, run_id, **settings), Round(acc=acc, joined={c: None for c in IDS}, base=GLOBAL,
                                                          template=template)


def _push(r: redis.Redis, run_id: str, cid: str, value: float, examples: int = 10) -> None:
    payload = messages.encode_update(run_id, 1, cid, examples, {"loss": 0.1}, NAMES, [t + value for t in GLOBAL])
    assert RunStore(r, run_id).push_update(cid, 1, payload, 1 << 20) == "ok"


def _push_bytes(r: redis.Redis, run_id: str, cid: str, payload: bytes) -> None:
    assert RunStore(r, run_id).push_update(cid, 1, payload, 1 << 20) == "ok"


def _outcome(store: RunStore, rnd: Round) -> tuple[Any, ...]:
    """What judging left behind: the audit trail, the refusals, who is folded, and the sum."""
    judged = sorted((j["client"], j["seq"], j["outcome"], j["bytes"]) for j in store.judged())
    refused = sorted((x["client"], x["reason"]) for x in store.refused() if x.get("stage") == "aggregate")
    total = [np.round(t, 6).tolist() for t in rnd.acc.result()] if rnd.folded else None
    return judged, refused, sorted(rnd.folded), sorted(rnd.refused), total


def _stage(r: redis.Redis, run_id: str) -> None:
    """One round's pushes: sound ones, a payload that is no update, a key of the wrong type,
    and one too large for a batch but not for the run."""
    _push(r, run_id, "a", 1.0)
    _push(r, run_id, "b", 2.0, examples=30)
    _push_bytes(r, run_id, "c", b"no update at all")
    r.set(RunStore(r, run_id).k.update("d", 1), "a string, not a hash")  # the client's own key
    _push_bytes(r, run_id, "e", b"x" * (READ_AHEAD_BYTES + 1))


@pytest.mark.parametrize("batched", [True, False])
def test_a_batch_meeting_refusals_judges_each_version_once(r: redis.Redis, batched: bool) -> None:
    store, judge, rnd = _setup(r, "t-ahead")
    _stage(r, "t-ahead")
    ids = [*IDS, "a", "c"]  # a wake-up named twice: judged once
    if batched:
        judge._consider_all(rnd, 1, ids, rnd.template)
        assert store.batch_reads == 1
        # e is read again on its own (too large for a batch), and so are the repeated ids
        assert store.single_reads == 3
    else:
        for cid in ids:
            judge._consider(rnd, 1, cid, rnd.template)
    judged, refused, folded, refused_ids, total = _outcome(store, rnd)
    assert [(c, s, o) for c, s, o, _ in judged] == [
        ("a", "1", "accepted"), ("b", "1", "accepted"), ("c", "1", "undecodable"), ("d", "string", "malformed"),
        ("e", "1", "undecodable")]
    assert refused == [("c", "undecodable"), ("d", "malformed"), ("e", "undecodable")]
    assert folded == ["a", "b"] and refused_ids == ["c", "d", "e"]
    assert rnd.reads == {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}
    assert total == [np.full((3, 2), 1.75).tolist(), np.full(2, 1.75).tolist()]  # (10 x 1 + 30 x 2) / 40


def test_batched_and_one_by_one_judging_leave_the_same_record(r: redis.Redis) -> None:
    outcomes = []
    for run_id, batched in (("t-one", False), ("t-many", True)):
        store, judge, rnd = _setup(r, run_id)
        _stage(r, run_id)
        if batched:
            judge._consider_all(rnd, 1, IDS, rnd.template)
        else:
            for cid in IDS:
                judge._consider(rnd, 1, cid, rnd.template)
        outcomes.append(_outcome(store, rnd))
    assert outcomes[0] == outcomes[1]


def test_a_push_landing_after_the_batch_read_is_judged_by_its_own_wake_up(r: redis.Redis) -> None:
    store, judge, rnd = _setup(r, "t-late")
    for k, cid in enumerate(IDS):
        _push(r, "t-late", cid, float(k))
    store.after_batch = lambda: _push(r, "t-late", "b", 10.0)  # b's second version, after the read
    judge._consider_all(rnd, 1, IDS, rnd.template)
    assert rnd.versions["b"] == "1"  # the batch judged what it read
    judge._consider_all(rnd, 1, ["b", "a"], rnd.template)  # the wake-up of b's push (and a stray one)
    judged = [(j["client"], j["seq"], j["outcome"]) for j in store.judged()]
    assert sorted(judged) == sorted([(c, "1", "accepted") for c in IDS] + [("b", "2", "accepted")])
    assert rnd.reads["b"] == 2 and rnd.reads["a"] == 1
    assert sorted(rnd.folded) == IDS
    # the sum holds b's second version only: (0 + 10 + 2 + 3 + 4) / 5
    assert np.allclose(rnd.acc.result()[1], 19 / 5)


def test_a_re_push_in_a_batch_rebuilds_the_sum_and_judges_each_version_once(r: redis.Redis) -> None:
    store, judge, rnd = _setup(r, "t-again")
    for cid in ("a", "b"):
        _push(r, "t-again", cid, 1.0)
    judge._consider_all(rnd, 1, ["a", "b"], rnd.template)
    for cid in ("a", "b"):  # both push again; b's new version replaces and rebuilds the sum first,
        _push(r, "t-again", cid, 5.0)  # which re-reads a: the rebuild judges a's second version
    judge._consider_all(rnd, 1, ["b", "a"], rnd.template)
    mine = sorted((j["client"], j["seq"], j["outcome"]) for j in store.judged())
    assert mine == [("a", "1", "accepted"), ("a", "2", "accepted"), ("b", "1", "accepted"), ("b", "2", "accepted")]
    assert rnd.versions == {"a": "2", "b": "2"} and rnd.reads == {"a": 2, "b": 2}
    assert np.allclose(rnd.acc.result()[0], 5.0)


def test_a_client_at_its_cap_is_refused_unread_in_a_batch(r: redis.Redis) -> None:
    store, judge, rnd = _setup(r, "t-cap", max_pushes_per_round=1)
    _push(r, "t-cap", "a", 1.0)
    _push(r, "t-cap", "b", 1.0)
    judge._consider_all(rnd, 1, ["a", "b"], rnd.template)
    _push(r, "t-cap", "a", 2.0)
    _push(r, "t-cap", "c", 3.0)
    _push(r, "t-cap", "d", 3.0)
    before = store.batch_reads
    judge._consider_all(rnd, 1, ["a", "c", "d"], rnd.template)
    assert store.batch_reads == before + 1  # c and d together; a is not read:
    assert r.exists(store.k.update_body("a", 1))  # its second version's bytes never left its key
    mine = [(j["seq"], j["outcome"], j["bytes"] == "0") for j in store.judged() if j["client"] == "a"]
    assert mine == [("1", "accepted", False), ("2", "too_many_pushes", True)]
    assert "a" in rnd.refused and "a" not in rnd.folded and sorted(rnd.folded) == ["b", "c", "d"]


def test_a_batch_read_loads_the_read_step_when_redis_does_not_know_it(r: redis.Redis) -> None:
    store, judge, rnd = _setup(r, "t-noscript")
    for cid in IDS[:3]:
        _push(r, "t-noscript", cid, 1.0)
    r.script_flush()  # as after a restart of Redis
    judge._consider_all(rnd, 1, IDS[:3], rnd.template)
    assert store.batch_reads == 1 and store.single_reads == 0
    assert sorted(rnd.folded) == IDS[:3]
    assert sorted((j["client"], j["outcome"]) for j in store.judged()) == [(c, "accepted") for c in IDS[:3]]
