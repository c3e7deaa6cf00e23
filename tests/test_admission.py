"""Admission (fedq.roles.admission): join requests become members or recorded refusals, in the join
phase and while training runs; an idle look at the waiting requests is a bounded read, never a
SCAN of the keyspace. Real Redis, no TensorFlow: the unit runs inside a small host that drives
it the way the aggregator does (drain the inbox, else look at what waits)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import pytest
import redis
from support.lua import assert_killed, mutant_failures

from fedq.learning.scaling import feature_stats
from fedq.learning.spec import RunSpec
from fedq.protocol.signing import Verifier
from fedq.protocol.store import RunStore
from fedq.roles.admission import Admission
from fedq.roles.judging import Round

RUN = "t-admit"
ROWS = np.arange(24, dtype=np.float64).reshape(8, 3)


class _Host(Admission):
    """What the aggregator gives the unit: the run's store, its registry, and a wait."""

    def __init__(self, r: redis.Redis, spec: RunSpec, verifier: Verifier | None = None) -> None:
        self.run_id, self.verifier = RUN, verifier
        self.store = RunStore(r, RUN)
        assert self.store.acquire_lease("driver", 30)
        self.ticks = 0
        self._join_rows = {}

    def _check_exists(self) -> None:
        assert self.store.exists()

    def _tick(self) -> None:  # the aggregator renews its lease here
        self.ticks += 1
        self.store.renew_lease(30)

    def _wait_quorum(self, spec: RunSpec, what: str, have: Callable[[], int], on_idle: Callable[[], None],
                     on_wake: Callable[[str], None]) -> None:
        deadline = time.monotonic() + 10
        while have() < spec.clients:
            assert time.monotonic() < deadline, f"{what}: only {have()} of {spec.clients}"
            woken = self.store.pop_inbox(0.05)
            if not woken:
                on_idle()
            for cid in woken:
                on_wake(cid)


def _spec(clients: int = 2) -> RunSpec:
    return RunSpec(clients=clients, rounds=1, run_id=RUN)


def _created(r: redis.Redis, clients: int = 2) -> RunSpec:
    spec = _spec(clients)
    RunStore(r, RUN).create(spec)
    return spec


def _ask(r: redis.Redis, cid: str, rows: np.ndarray = ROWS, **record: object) -> str:
    return RunStore(r, RUN).join(cid, {"shard": 0, "rows": len(rows), **record},
                                         feature_stats(rows).to_dict())


def _refusals(store: RunStore) -> list[tuple[str, str]]:
    return [(rec["client"], rec["reason"]) for rec in store.refused()]


def _scans(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def test_the_join_phase_admits_valid_requests_and_combines_their_statistics(r: redis.Redis) -> None:
    spec = _created(r)
    other = ROWS * 2 + 1
    assert _ask(r, "c0") == "requested" and _ask(r, "c1", other) == "requested"
    host = _Host(r, spec)
    mean, std = host._collect_joins(spec, num_features=3)
    both = np.vstack([ROWS, other])
    np.testing.assert_allclose(mean, both.mean(axis=0))
    np.testing.assert_allclose(std, both.std(axis=0))
    assert host.store.member_ids() == ["c0", "c1"]
    assert not r.exists(host.store.k.joins)  # every waiting request was taken up


def test_a_look_at_many_requests_keeps_the_lease_between_them(r: redis.Redis) -> None:
    spec = _created(r, clients=5)
    for k in range(5):
        assert _ask(r, f"c{k}") == "requested"
    r.delete(RunStore(r, RUN).k.inbox)  # no wake-ups: the first idle look finds all five
    host = _Host(r, spec)
    host._collect_joins(spec, num_features=3)
    assert host.store.member_ids() == [f"c{k}" for k in range(5)]
    assert host.ticks >= 5  # a loaded machine judging hundreds in one look lost its lease (300 clients)


@pytest.mark.parametrize(("record", "rows", "reason", "words"), [
    ({}, ROWS[:, :2], "bad_stats", "2 features, the run's data has 3"),
    ({"num_shards": 5}, ROWS, "shard_plan", "--num-shards 5 does not match the run's 1 shards"),
])
def test_a_bad_request_is_refused_with_its_reason_and_the_run_opens_without_it(
        r: redis.Redis, record: dict[str, object], rows: np.ndarray, reason: str, words: str) -> None:
    spec = _created(r, clients=1)
    assert _ask(r, "bad", rows, **record) == "requested"
    assert _ask(r, "good") == "requested"
    host = _Host(r, spec)
    host._collect_joins(spec, num_features=3)
    assert host.store.member_ids() == ["good"]
    assert _refusals(host.store) == [("bad", reason)]
    verdict = RunStore(r, RUN).wait_admitted("bad", timeout=1)
    assert verdict.startswith(f"{reason}: ") and words in verdict


def test_with_a_client_registry_only_its_clients_are_admitted(r: redis.Redis) -> None:
    spec = _created(r, clients=1)
    verifier = Verifier({"known": object()})  # type: ignore[dict-item]  # knows() reads the ids only
    assert _ask(r, "stranger") == "requested" and _ask(r, "known") == "requested"
    host = _Host(r, spec, verifier)
    host._collect_joins(spec, num_features=3)
    assert host.store.member_ids() == ["known"]
    assert _refusals(host.store) == [("stranger", "unknown_key")]


def _training(r: redis.Redis, clients: int = 3) -> tuple[_Host, Round, RunSpec]:
    """A run training with member c0 and room for clients - 1 more; the host has swept once."""
    spec = _created(r, clients)
    assert _ask(r, "c0") == "requested"
    host = _Host(r, spec)
    assert host.store.admit("c0") and host.store.open_training(b"scaler", b"global")
    rnd = Round(acc=None, joined=host._joined())  # type: ignore[arg-type]  # admission never folds
    host._admit_waiting(spec, rnd)  # the session's first look: a sweep
    return host, rnd, spec


def test_a_request_while_training_is_admitted_at_an_idle_look_without_a_scan(r: redis.Redis) -> None:
    host, rnd, spec = _training(r)
    assert _ask(r, "late") == "requested"
    assert r.smembers(host.store.k.joins) == {b"late"}
    scans = _scans(r)
    assert scans > 0  # the session's first look swept
    host._admit_waiting(spec, rnd)
    assert set(rnd.joined) == {"c0", "late"} and host.store.member_ids() == ["c0", "late"]
    for _ in range(3):
        host._admit_waiting(spec, rnd)  # idle looks with nothing waiting
    assert _scans(r) == scans
    assert not r.exists(host.store.k.joins)


def test_a_wake_up_admits_a_late_joiner_while_there_is_room(r: redis.Redis) -> None:
    host, rnd, spec = _training(r, clients=2)
    assert _ask(r, "late") == "requested" and _ask(r, "later") == "requested"
    host._admit_woken(spec, rnd, "late")
    host._admit_woken(spec, rnd, "later")  # the run is full now: not even read
    assert set(rnd.joined) == {"c0", "late"}
    host._admit_waiting(spec, rnd)  # full: nothing is taken off the waiting requests
    assert r.smembers(host.store.k.joins) == {b"late", b"later"}


def test_a_request_taken_when_the_run_fills_up_is_answered_run_full(r: redis.Redis) -> None:
    host, rnd, spec = _training(r, clients=2)
    for cid in ("a", "b"):
        assert _ask(r, cid) == "requested"
    host._admit_waiting(spec, rnd)
    assert len(rnd.joined) == 2
    (outsider,) = {"a", "b"} - set(rnd.joined)
    assert RunStore(r, RUN).wait_admitted(outsider, timeout=1).startswith("run_full")
    assert not r.exists(host.store.k.joins)


def test_junk_among_the_waiting_requests_is_dropped_and_costs_one_look(r: redis.Redis) -> None:
    host, rnd, spec = _training(r)
    k = host.store.k
    r.sadd(k.joins, "x" * 65, "x" * 10_000, "<script>", "a:b{c}", "nobody", "c0")
    assert _ask(r, "late") == "requested"
    host._admit_waiting(spec, rnd)
    assert host.store.member_ids() == ["c0", "late"]
    assert not r.exists(k.joins)
    assert _refusals(host.store) == []  # ids that filed nothing are no refusals: nothing to refuse


def test_an_oversized_entry_is_dropped_in_redis_never_sent(r: redis.Redis) -> None:
    store = RunStore(r, RUN)
    r.sadd(store.k.joins, "x" * (1 << 20), "c0")
    sent = int(r.info("stats")["total_net_output_bytes"])
    assert store.take_join_requests() == ["c0"]
    assert int(r.info("stats")["total_net_output_bytes"]) - sent < 64 << 10
    assert not r.exists(store.k.joins)


def test_a_look_takes_at_most_its_batch(r: redis.Redis) -> None:
    store = RunStore(r, RUN)
    r.sadd(store.k.joins, *[f"c{i}" for i in range(250)])
    taken = store.take_join_requests(limit=100)
    assert len(taken) == len(set(taken)) == 100
    assert r.scard(store.k.joins) == 150 and not set(taken) & {m.decode() for m in r.smembers(store.k.joins)}


def test_a_waiting_requests_key_of_another_type_reads_as_empty(r: redis.Redis) -> None:
    store = RunStore(r, RUN)
    r.set(store.k.joins, json.dumps(["c0"]))
    assert store.take_join_requests() == []
    assert r.type(store.k.joins) == b"string"


def test_a_new_driving_session_sweeps_for_requests_taken_but_never_judged(r: redis.Redis) -> None:
    host, rnd, spec = _training(r)
    assert _ask(r, "late") == "requested"
    assert host.store.take_join_requests() == ["late"]  # a driver took it, then stopped
    host._admit_waiting(spec, rnd)
    assert "late" not in rnd.joined  # no longer waiting: the idle look does not see it
    successor = _Host.__new__(_Host)
    successor.run_id, successor.verifier, successor.store, successor.ticks = RUN, None, host.store, 0
    successor._join_rows = {}
    fresh = Round(acc=None, joined=successor._joined())  # type: ignore[arg-type]
    successor._admit_waiting(spec, fresh)
    assert set(fresh.joined) == {"c0", "late"}


def test_only_a_new_request_waits(r: redis.Redis) -> None:
    _created(r, clients=1)
    store = RunStore(r, RUN)
    assert _ask(r, "c0") == "requested"
    assert store.acquire_lease("driver", 30) and store.admit("c0")
    r.delete(store.k.joins)
    assert _ask(r, "c0") == "rejoined"  # a member asking again waits for nothing
    assert _ask(r, "c1") == "run_full"
    assert not r.exists(store.k.joins)


# --- hand-written mutants of the Lua steps admission relies on -------------------------------------

MUTANTS: dict[str, tuple[str, str, str]] = {
    "join: the request does not wait": ("JOIN", r"^redis\.call\('SADD', a\.joins, a\.client\)\n", ""),
    "waiting joins: entries of any size": ("WAITING_JOINS", r"string\.len\(id\) <= 64", "true"),
    "waiting joins: another type read": ("WAITING_JOINS", r"if t ~= 'set' then return \{\} end", ""),
}
CHECKS = [test_a_request_while_training_is_admitted_at_an_idle_look_without_a_scan,
          test_junk_among_the_waiting_requests_is_dropped_and_costs_one_look,
          test_an_oversized_entry_is_dropped_in_redis_never_sent,
          test_a_waiting_requests_key_of_another_type_reads_as_empty]


def test_the_unmutated_scripts_pass_every_check(r: redis.Redis) -> None:
    assert mutant_failures(r, CHECKS) == []


@pytest.mark.parametrize("mutant", MUTANTS)
def test_each_lua_mutant_fails_an_admission_test(r: redis.Redis, monkeypatch: pytest.MonkeyPatch, mutant: str) -> None:
    assert_killed(r, monkeypatch, MUTANTS, mutant, CHECKS)


def test_the_rows_a_member_joined_with_hold_for_the_run_and_cost_one_look_a_round(r: redis.Redis) -> None:
    """Each round the aggregator reads the member set; a member's join record only when it is
    first seen: a record rewritten after admission (the client's own key) changes nothing."""
    host, rnd, spec = _training(r)
    assert rnd.joined == {"c0": len(ROWS)}
    r.hset(host.store.k.joined("c0"), "record", json.dumps({"shard": 0, "rows": 10**9}))
    before = r.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)
    assert host._joined() == {"c0": len(ROWS)}  # its claim as admitted
    assert r.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0) == before  # no record read
    assert _ask(r, "late", ROWS[:2]) == "requested"
    host._admit_waiting(spec, rnd)
    assert rnd.joined == {"c0": len(ROWS), "late": 2}  # a newcomer's record is read
    host.store.refuse_join("late", "shard_plan", "left the run")
    assert host._joined() == {"c0": len(ROWS)}
