"""Edges of the protocol store that mutation testing found unguarded: the version a cheap look
and the update guard give one stored update must agree (else a version is judged twice), what
a refusal at the door records, who may act without a lease (tools) and who may not, and the
caps on the event streams. Real Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from fedq.errors import ConfigError
from fedq.protocol import keys
from fedq.protocol.fencing import Commit, LeaseLost
from fedq.protocol.replies import valid_client_id
from fedq.protocol.run_records import MAX_EVENTS
from fedq.protocol.store import RunStore
from fedq.protocol.update_reads import StoredUpdate, version_marker
from fedq.protocol.vocabulary import Phase, Read

RUN = "t-edges"


class _Spec:
    def __init__(self, rounds: int = 1) -> None:
        self.rounds, self.clients = rounds, 2

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "clients": self.clients}


def _training(r: redis.Redis, driver: str = "driver") -> RunStore:
    store = RunStore(r, RUN)
    store.create(_Spec())
    assert store.acquire_lease(driver, 30)
    for cid in ("c0", "c1"):
        assert store.join(cid, {"shard": 0}, {"count": [1]}) == "requested"
        assert store.admit(cid)
    assert store.open_training(b"scaler", b"global")
    return store


# --- versions: the cheap look and the guard name a stored update alike -----------------------------

@pytest.mark.parametrize("seq", ["7", "9" * 15, "9" * 16, "", "abc", "x" * 40])
def test_the_cheap_look_and_the_guard_name_one_version_alike(r: redis.Redis, seq: str) -> None:
    store = _training(r)
    r.hset(store.k.update("c0", 1), mapping={"seq": seq})
    r.set(store.k.update_body("c0", 1), b"u")
    stored = store.read_update(1, "c0", "", 1000)
    assert store.update_seqs(1) == {"c0": stored.version}
    assert store.update_seq(1, "c0") == stored.version
    ok = seq.isdigit() and len(seq) <= 15
    assert stored.kind == (Read.OK if ok else Read.BAD_SEQ)
    assert stored.version == (seq if ok else "!bad_seq:" + seq[:32])
    if ok:
        assert store.read_update(1, "c0", seq, 1000).kind == Read.SEEN  # judged: not sent again


def test_version_markers() -> None:
    assert version_marker(Read.OK, "7") == "7"
    assert version_marker(Read.BAD_SEQ, "y" * 40) == "!bad_seq:" + "y" * 32
    assert version_marker(Read.WRONG_TYPE, "7") == "!wrong_type"


def test_the_guard_reports_the_push_id_of_an_update_in_parts_and_none_for_a_whole_one(r: redis.Redis) -> None:
    store = _training(r)
    assert store.push_update("c0", 1, b"whole", 1000) == "ok"
    assert store.push_update("c1", 1, b"head", 1000, part_id="p7") == "ok"
    assert store.read_update(1, "c0", "", 1000) == StoredUpdate(Read.OK, "1", b"whole", "")
    assert store.read_update(1, "c1", "", 1000) == StoredUpdate(Read.OK, "1", b"head", "p7")
    assert store.read_update(1, "nobody", "", 1000) == StoredUpdate(Read.NONE)
    assert store.read_update(1, "bad id!", "", 1000) == StoredUpdate(Read.NONE)


def test_a_read_limited_to_one_version_sends_no_other(r: redis.Redis) -> None:
    store = _training(r)
    assert store.push_update("c0", 1, b"v1", 1000) == "ok"
    assert store.read_update(1, "c0", "", 1000, only="1") == StoredUpdate(Read.OK, "1", b"v1", "")
    assert store.push_update("c0", 1, b"v2", 1000) == "ok"
    assert store.read_update(1, "c0", "", 1000, only="1") == StoredUpdate(Read.CAPPED)
    r.delete(store.k.update("c0", 1))
    r.set(store.k.update("c0", 1), "1")  # not a hash: no version at all
    assert store.read_update(1, "c0", "", 1000, only="1") == StoredUpdate(Read.CAPPED)
    assert store.read_update(1, "c1", "", 1000, only="1") == StoredUpdate(Read.NONE)


def test_ids_that_are_empty_or_absent_are_no_ids() -> None:
    assert not valid_client_id("") and not valid_client_id(None) and valid_client_id("c0")


# --- refusals at the door --------------------------------------------------------------------------

def test_a_refused_push_records_when_and_why(r: redis.Redis) -> None:
    store = _training(r)
    before = time.time()
    assert store.push_update("c0", 1, b"x" * 11, 10) == "too_large"
    (rec,) = store.refused()
    assert (rec["client"], rec["round"], rec["reason"], rec["stage"]) == ("c0", 1, "too_large", "push")
    assert before - 1 <= rec["time"] <= time.time() + 1  # cjson keeps 14 digits
    assert store.refuse_push("c1", 1, "too_large", "in parts") == "too_large"
    assert [(x["client"], x["detail"]) for x in store.refused()][-1] == ("c1", "in parts")
    assert [p["outcome"] for p in store.pushes()] == ["too_large", "too_large"]


def test_only_the_chosen_clients_evaluate_and_a_refused_evaluation_is_recorded(r: redis.Redis) -> None:
    store = _training(r)
    assert store.commit_round(Commit(round=1, global_payload=b"g1", metrics={"round": 1}, after=Phase.EVAL,
                                     next_selected=["c1"]))
    before = time.time()
    assert store.push_eval("c0", 1, b"{}", 1000) == "not_selected"
    assert store.push_eval("c1", 1, b"x" * 11, 10) == "too_large"
    assert store.push_eval("c1", 1, b"{}", 1000) == "ok"
    refused = store.refused()
    assert [(x["client"], x["reason"], x["stage"]) for x in refused] == [
        ("c0", "not_selected", "evaluate"), ("c1", "too_large", "evaluate")]
    assert all(before - 1 <= x["time"] <= time.time() + 1 for x in refused)
    assert store.evals() == {"c1": b"{}"}


# --- who may act without the lease -----------------------------------------------------------------

def test_tools_without_a_lease_may_admit_and_fail_a_run(r: redis.Redis) -> None:
    store = RunStore(r, RUN)
    store.create(_Spec())
    assert store.acquire_lease("driver", 30)
    assert store.join("c0", {"shard": 0}, {}) == "requested"
    tool = RunStore(r, RUN)  # fedq run, tests: no driver, unfenced
    assert tool.admit("c0") and tool.member_ids() == ["c0"]
    assert tool.fail("stopped by the operator") is True
    assert tool.state()["status"] == "failed"


def test_the_holder_releases_its_lease_and_says_so(r: redis.Redis) -> None:
    store = _training(r)
    assert store.release_lease() is True
    assert store.driver is None and not r.exists(store.k.lease)
    assert r.xrange(store.k.events)[-1][1] == {b"event": b"released"}


def test_a_stale_open_says_what_it_lost(r: redis.Redis) -> None:
    stale = RunStore(r, RUN)
    stale.create(_Spec())
    stale.driver = "nobody"  # never acquired
    with pytest.raises(LeaseLost, match="lease lost before training opened"):
        stale.open_training(b"scaler", b"global")


def test_a_stale_finish_says_what_it_lost(r: redis.Redis) -> None:
    store = _training(r)
    assert store.commit_round(Commit(round=1, global_payload=b"g1", metrics={"round": 1}, after=Phase.EVAL))
    store.driver = "somebody else"
    with pytest.raises(LeaseLost, match="lease lost before finishing round 1's evaluation"):
        store.finish_evaluation(1, None, {})


def test_the_chosen_clients_of_a_round_that_chose_none_are_none(r: redis.Redis) -> None:
    store = _training(r)
    assert store.selected(1) is None and store.selected(7) is None
    assert RunStore(r, "t-none").committed_round() == 0


# --- the event streams stay capped -----------------------------------------------------------------

def _fill(r: redis.Redis, stream: str, n: int) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"filler": i})
    pipe.execute()


@pytest.mark.parametrize("step", ["create", "commit (done)", "finish evaluation", "fail"])
def test_every_event_stream_write_keeps_its_cap(r: redis.Redis, step: str) -> None:
    store = _training(r) if step != "create" else RunStore(r, RUN)
    if step == "finish evaluation":
        assert store.commit_round(Commit(round=1, global_payload=b"g1", metrics={"round": 1}, after=Phase.EVAL))
    for stream in (keys.EVENTS, store.k.events):
        _fill(r, stream, MAX_EVENTS + 500)
    if step == "create":
        store.create(_Spec())
    elif step == "commit (done)":
        assert store.commit_round(Commit(round=1, global_payload=b"g1", metrics={"round": 1}, after=Phase.DONE))
    elif step == "finish evaluation":
        assert store.finish_evaluation(1, None, {})
    else:
        assert store.fail("out of patience")
    for stream in (keys.EVENTS, store.k.events):
        assert MAX_EVENTS <= r.xlen(stream) <= MAX_EVENTS + 100, stream  # trimmed, approximately


# --- what a refusal record holds, exactly --------------------------------------------------------

def _without_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert all(isinstance(rec["time"], float) for rec in records)
    return [{k: v for k, v in rec.items() if k != "time"} for rec in records]


def test_refusal_records_hold_exactly_who_when_where_and_why(r: redis.Redis) -> None:
    store = _training(r)
    store.refuse_join("c0", "bad_stats", "x" * 600)
    store.record_refused("c1", 3, "malformed", "why")
    store.record_refused("c1", 4, "malformed", "again")
    assert store.refuse_push("c1", 1, "too_large", "in parts") == "too_large"
    for _ in range(3):
        store.refuse_push("c0", 2, "too_large", "again")
    assert len(r.lrange(store.k.client_refused("c0"), 0, -1)) == 3  # the client's own log keeps them all
    r.delete(store.k.client_refused("c0"), store.k.client_pushes("c0"))
    assert _without_time(store.refused()) == [
        {"client": "c0", "round": 0, "reason": "bad_stats", "detail": "x" * 500, "stage": "aggregate"},
        {"client": "c1", "round": 3, "reason": "malformed", "detail": "why", "stage": "aggregate"},
        {"client": "c1", "round": 4, "reason": "malformed", "detail": "again", "stage": "aggregate"},
        {"client": "c1", "round": 1, "reason": "too_large", "detail": "in parts", "stage": "push"}]
    assert r.hget(store.k.joined("c0"), "verdict") == ("bad_stats: " + "x" * 600)[:500].encode()
    assert store.pushes() == [{"client": "c1", "round": "1", "digest": "", "outcome": "too_large", "bytes": "0"}]


def test_a_clients_own_refusal_log_is_read_as_hostile(r: redis.Redis) -> None:
    store = _training(r)
    own = store.k.client_refused("c0")
    r.rpush(own, json.dumps({"client": "y" * 100, "reason": "r" * 100, "detail": "d" * 600, "time": "5", "x": 1}),
            json.dumps({"time": 7}), json.dumps({"client": "c0"}), json.dumps({"time": "nan"}), "not json")
    assert store.refused() == [
        {"client": "c0", "reason": "", "detail": "", "time": 0.0},
        {"client": "y" * 64, "reason": "r" * 64, "detail": "d" * 500, "time": 5.0, "x": 1},
        {"client": "", "reason": "", "detail": "", "time": 7.0}]


def test_the_version_of_an_absent_update_is_empty_and_any_valid_id_is_looked_up(r: redis.Redis) -> None:
    store = _training(r)
    assert store.update_seq(1, "c0") == ""
    r.hset(store.k.update("stranger", 1), mapping={"seq": "3"})
    assert store.update_seq(1, "stranger") == "3"  # not a member: looked up all the same
    r.set(store.k.update("c1", 1), "a string")
    assert store.update_seq(1, "c1") == "!wrong_type"


def test_a_run_is_created_once_with_its_spec_and_round_zero(r: redis.Redis) -> None:
    store = RunStore(r, RUN)
    store.create(_Spec(rounds=4))
    with pytest.raises(ConfigError, match=f"^run {RUN} already exists$"):
        RunStore(r, RUN).create(_Spec(rounds=9))
    assert store.spec_record() == {"rounds": 4, "clients": 2}
    assert (store.state()["round"], store.state()["phase"], store.state()["status"]) == ("0", "join", "queued")


def test_a_join_request_with_one_part_unreadable_is_no_request(r: redis.Redis) -> None:
    store = RunStore(r, RUN)
    r.hset(store.k.joined("c0"), mapping={"record": "{}", "stats": "not json"})
    r.hset(store.k.joined("c1"), mapping={"record": "[1]", "stats": "{}"})
    assert store.join_request("c0") is None and store.join_request("c1") is None


def test_finishing_without_a_last_record_leaves_the_records_as_they_are(r: redis.Redis) -> None:
    store = _training(r)
    assert store.commit_round(Commit(round=1, global_payload=b"g1", metrics={"round": 1}, after=Phase.EVAL))
    assert store.finish_evaluation(1, None, {"round": 1})
    assert store.metrics() == [{"round": 1}]
