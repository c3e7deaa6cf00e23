"""Round trips on a round's critical path: the audit trail rides with the aggregator's next call,
a round's close and its last look are one send, a client waiting to be admitted is not woken by
every other client's admission, and `fedq simulate` spreads clients over enough processes.
Real Redis; sends are counted on the connection (one send is one round trip)."""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.connection import AbstractConnection
from support.federation import noisy

from fedq.protocol import scripts
from fedq.protocol.fencing import Commit, LeaseLost
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Join, Phase, Push, Read
from fedq.roles.swarm import default_processes

RUN = "t-trips"
_COMMAND = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n(?:\$40\r\n([0-9a-f]{40}))?")  # a command, its script
_SHAS = {hashlib.sha1(text.encode()).hexdigest(): name for name, text in scripts.SCRIPTS.items()}


def _names(command: Any) -> tuple[str, ...]:
    """The commands of one send by name, a script's run by the script's (large chunks skipped)."""
    chunks = [command] if isinstance(command, (bytes, str)) else command
    found = [m for c in chunks if isinstance(c, bytes) and len(c) < 1 << 16 for m in _COMMAND.finditer(c)]
    return tuple(_SHAS.get((m.group(2) or b"").decode(), m.group(1).decode().upper()) for m in found)


class _Spec:
    rounds, clients = 2, 3

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": 2, "clients": 3}


@pytest.fixture()
def sends(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A one-item list counting every send to Redis (a command, a pipeline, a MULTI)."""
    count = [0]
    original = AbstractConnection.send_packed_command

    def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        count[0] += 1
        original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    yield count


@pytest.fixture()
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, ...]]]:
    """Every send to Redis from now on, as its commands' names (_names)."""
    names: list[tuple[str, ...]] = []
    original = AbstractConnection.send_packed_command

    def logged(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        names.append(_names(command))
        original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", logged)
    yield names


def _training(r: redis.Redis, members: tuple[str, ...] = ("c0", "c1")) -> RunStore:
    store = RunStore(r, RUN)
    store.create(_Spec())
    assert store.acquire_lease("driver", 30)
    for cid in members:
        assert store.join(cid, {"shard": 0}, {"count": [1]}) == Join.REQUESTED and store.admit(cid)
    assert store.open_training(b"scaler", b"global")
    store.read_update(1, "c0", "", 10)  # the read script loaded: the counts below are steady state
    return store


def test_judgements_ride_with_the_next_read_in_order(r: redis.Redis, sends: list[int]) -> None:
    store = _training(r)
    client = RunStore(r, RUN)
    assert client.push_update("c0", 1, b"update", 1000) == Push.OK
    before = sends[0]
    store.record_judged("c1", 1, "1", "d1", "accepted", 10)
    store.record_judged("c1", 1, "2", "", "too_many_pushes", 0)
    got = store.read_update(1, "c0", "", 1000)
    assert sends[0] - before == 1  # the two entries and the read: one send
    assert got.kind == Read.OK and got.payload == b"update"
    assert [(j["seq"], j["outcome"]) for j in RunStore(r, RUN).judged()] == [("1", "accepted"),
                                                                            ("2", "too_many_pushes")]


def test_a_commit_is_preceded_by_its_judgements(r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _training(r)
    store.record_judged("c0", 1, "1", "d", "accepted", 6)
    sent: list[bytes] = []
    original = AbstractConnection.send_packed_command

    def logged(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        chunks = [command] if isinstance(command, bytes) else command
        sent.append(b"".join(c for c in chunks if isinstance(c, bytes) and len(c) < 1 << 16))
        original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", logged)
    assert store.commit_round(Commit(round=1, global_payload=b"g1", metrics={"round": 1}, members=["c0", "c1"]))
    trail = r.xrange(store.k.judged)
    assert [f[b"client"] for _id, f in trail] == [b"c0"]
    judged = next(i for i, s in enumerate(sent) if store.k.judged.encode() in s)
    committed = next(i for i, s in enumerate(sent) if store.k.global_staged.encode() in s)
    assert judged < committed  # sent before the commit (Redis runs one connection's sends in order)


def test_the_close_and_its_last_look_are_one_send(r: redis.Redis, sends: list[int]) -> None:
    store = _training(r)
    client = RunStore(r, RUN)
    assert client.push_update("c0", 1, b"u0", 1000) == Push.OK
    store.record_judged("c0", 1, "1", "d", "accepted", 2)
    store.close_round(1)  # the close script loaded (as a round before this one would have)
    r.hdel(store.k.state, "closed")
    r.set(store.k.alive("c1"), "1", ex=60)  # c1's heartbeat: it has not pushed, but it lives
    before = sends[0]
    members, seqs, alive = store.close_and_look(1, ["c0", "c1"])
    assert sends[0] - before == 1
    assert members == ["c0", "c1"] and seqs == {"c0": "1"} and alive == 1
    assert client.push_update("c1", 1, b"late", 1000) == Push.ROUND_CLOSED
    assert [j["client"] for j in store.judged()] == ["c0"]


def test_a_read_after_a_script_flush_is_still_one_multi(r: redis.Redis, sent: list[tuple[str, ...]]) -> None:
    """Redis restarted (or its scripts flushed): the read step is loaded and the whole MULTI sent
    again, so that the GET and the move of the bytes still run right after the step, with no
    push in between, and the bytes move exactly as they do when the step is loaded."""
    store = _training(r)
    assert RunStore(r, RUN).push_update("c0", 1, b"update", 1000) == Push.OK
    store.record_judged("c1", 1, "1", "d1", "accepted", 10)
    r.script_flush()
    sent.clear()
    got, sends = store.read_update(1, "c0", "", 1000), sent[:]
    assert (got.kind, got.seq, got.payload) == (Read.OK, "1", b"update")
    body, moving, taken = (store.k.update_body("c0", 1), store.k.update_sent("c0", 1),
                           store.k.update_taken("c0", 1))
    assert not r.exists(body) and not r.exists(moving) and r.get(taken) == b"update"
    read = ("MULTI", "READ_UPDATE", "GET", "RENAME", "EXEC")
    assert sends == [("MULTI", "XADD", *read[1:]), ("SCRIPT",), read]  # the judgement rode the first only
    assert [(j["client"], j["seq"]) for j in store.judged()] == [("c1", "1")]
    assert store.read_update(1, "c0", "", 1000).payload == b"update"  # and reads again as it would


def test_a_close_after_a_script_flush_still_looks_in_the_same_send(r: redis.Redis,
                                                                  sent: list[tuple[str, ...]]) -> None:
    store = _training(r)
    client = RunStore(r, RUN)
    assert client.push_update("c0", 1, b"u0", 1000) == Push.OK
    store.record_judged("c0", 1, "1", "d", "accepted", 2)
    r.set(store.k.alive("c1"), "1", ex=60)
    r.script_flush()
    sent.clear()
    (members, seqs, alive), sends = store.close_and_look(1, ["c0", "c1"]), sent[:]
    assert members == ["c0", "c1"] and seqs == {"c0": "1"} and alive == 1
    look = ("CLOSE", "SMEMBERS", "EXISTS", "HGET", "HGET")
    assert sends == [("XADD", *look), ("SCRIPT",), look]
    assert client.push_update("c1", 1, b"late", 1000) == Push.ROUND_CLOSED
    assert [j["client"] for j in store.judged()] == ["c0"]


def test_a_push_and_a_commit_after_a_script_flush_send_the_bytes_with_the_script(
        r: redis.Redis, sent: list[tuple[str, ...]]) -> None:
    """Redis restarted (or its scripts flushed): the push step (the commit) is loaded and its
    staged bytes are SET again in the same MULTI as it, and it moves them as it would."""
    store = _training(r)
    r.script_flush()
    sent.clear()
    assert RunStore(r, RUN).push_update("c0", 1, b"update", 1000) == Push.OK
    push = ("MULTI", "SET", "PUSH", "EXEC")
    assert sent == [push, ("SCRIPT",), push]
    assert store.read_update(1, "c0", "", 1000).payload == b"update"
    r.script_flush()
    sent.clear()
    assert store.commit_round(Commit(round=1, global_payload=b"g1", metrics={"round": 1}, members=["c0", "c1"]))
    commit = ("MULTI", "SET", "COMMIT", "EXEC")
    assert sent == [commit, ("SCRIPT",), commit]
    assert store.global_payload() == b"g1" and store.committed_round() == 1 and not r.exists(store.k.global_staged)


def _between_the_tries(r: redis.Redis, monkeypatch: pytest.MonkeyPatch, other: Callable[[], Any]) -> None:
    """Run other (another writer) once, right after the next load of a script on r: between a
    staged call's send that found the script unloaded and what the caller sends next."""
    load = r.script_load

    def loaded_then_other(source: str) -> Any:
        sha = load(source)
        monkeypatch.setattr(r, "script_load", load)
        other()
        return sha

    monkeypatch.setattr(r, "script_load", loaded_then_other)


def test_a_staged_call_gives_up_after_its_second_try(r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _training(r)
    _between_the_tries(r, monkeypatch, r.script_flush)  # flushed again before the second try
    r.script_flush()
    with pytest.raises(redis.exceptions.NoScriptError):
        RunStore(r, RUN).push_update("c0", 1, b"mine", 1000)
    assert store.update_seq(1, "c0") == ""  # nothing pushed


@pytest.mark.parametrize("other", ["stages", "pushes"])
def test_a_push_after_a_script_flush_stores_the_callers_bytes(r: redis.Redis, sent: list[tuple[str, ...]],
                                                              monkeypatch: pytest.MonkeyPatch, other: str) -> None:
    """A second process of the same client stages (or pushes) its own bytes while the first
    one's push waits for its step to load: the first one's push still stores its own bytes."""
    store = _training(r)
    twin = RunStore(redis.Redis(connection_pool=r.connection_pool), RUN)
    if other == "stages":
        _between_the_tries(r, monkeypatch, lambda: twin.r.set(store.k.update_staged("c0"), b"twin's"))
    else:
        _between_the_tries(r, monkeypatch, lambda: twin.push_update("c0", 1, b"twin's", 1000))
    r.script_flush()
    sent.clear()
    assert RunStore(r, RUN).push_update("c0", 1, b"mine", 1000) == Push.OK
    sends = sent[:]
    got = store.read_update(1, "c0", "", 1000)
    assert got.kind == Read.OK and got.payload == b"mine"
    assert not r.exists(store.k.update_staged("c0"))
    step = ("MULTI", "SET", "PUSH", "EXEC")
    between = [("SET",)] if other == "stages" else [step]  # the twin's, right after the load
    assert sends == [step, ("SCRIPT",), *between, step]


@pytest.mark.parametrize("other", ["stages", "commits"])
def test_a_commit_after_a_script_flush_commits_the_drivers_own_model(
        r: redis.Redis, sent: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch, other: str) -> None:
    """A deposed driver still running stages its model (or commits: refused, it drops the staged
    key) while the new driver's commit waits for its step to load: the new driver's model is
    the one committed."""
    store = _training(r)
    deposed = RunStore(redis.Redis(connection_pool=r.connection_pool), RUN)
    deposed.driver = "deposed"
    commit = Commit(round=1, global_payload=b"new driver's", metrics={"round": 1}, members=["c0", "c1"])

    def deposed_commits() -> None:
        with pytest.raises(LeaseLost):
            deposed.commit_round(Commit(round=1, global_payload=b"old driver's", metrics={"round": 1},
                                        members=["c0", "c1"]))

    if other == "stages":
        _between_the_tries(r, monkeypatch, lambda: deposed.r.set(store.k.global_staged, b"old driver's"))
    else:
        _between_the_tries(r, monkeypatch, deposed_commits)
    r.script_flush()
    sent.clear()
    assert store.commit_round(commit)
    sends = sent[:]
    assert store.global_payload() == b"new driver's" and store.committed_round() == 1
    assert not r.exists(store.k.global_staged)
    step = ("MULTI", "SET", "COMMIT", "EXEC")
    between = [("SET",)] if other == "stages" else [step, ("DEL",)]  # the deposed driver's
    assert sends == [step, ("SCRIPT",), *between, step]


def test_the_last_look_finds_members_the_caller_did_not_know(r: redis.Redis) -> None:
    store = _training(r, ("c0", "c1", "c2"))
    client = RunStore(r, RUN)
    for cid in ("c0", "c2"):
        assert client.push_update(cid, 1, b"u", 1000) == Push.OK
    r.hset(store.k.update("stranger", 1), mapping={"seq": "1", "payload": b"x"})  # no member
    members, seqs, _ = store.close_and_look(1, ["c0", "stranger"])
    assert members == ["c0", "c1", "c2"]
    assert seqs == {"c0": "1", "c2": "1"}  # the stranger's key is no member's: not looked at


def test_the_close_is_fenced_by_the_lease(r: redis.Redis) -> None:
    store = _training(r)
    r.set(store.k.lease, "someone else")
    with pytest.raises(LeaseLost):
        store.close_and_look(1, ["c0", "c1"])
    assert RunStore(r, RUN).push_update("c0", 1, b"u", 1000) == Push.OK  # not closed


def test_other_admissions_do_not_wake_a_waiting_client(r: redis.Redis, sends: list[int]) -> None:
    store = RunStore(r, RUN)
    store.create(_Spec())
    assert store.acquire_lease("driver", 30)
    waiting = RunStore(redis.Redis(connection_pool=r.connection_pool), RUN)
    assert waiting.join("c2", {"shard": 2}, {"count": [1]}) == Join.REQUESTED
    for cid in ("c0", "c1"):  # admitted before the wait: their events are old news
        assert store.join(cid, {"shard": 0}, {"count": [1]}) == Join.REQUESTED and store.admit(cid)
    before = sends[0]
    assert waiting.wait_admitted("c2", timeout=0.3, block_seconds=1.0) == Join.TIMEOUT
    assert sends[0] - before <= 3  # a look, the wait on its own list, a look (no page through the admissions)
    assert store.admit("c2")
    assert waiting.wait_admitted("c2", timeout=5) == Join.JOINED
    assert store.state()["phase"] == Phase.JOIN


def test_an_answer_wakes_only_the_client_it_answers(r: redis.Redis) -> None:
    store = RunStore(r, RUN)
    store.create(_Spec())
    assert store.acquire_lease("driver", 30)
    for cid in ("c0", "c1", "c2"):
        assert store.join(cid, {"shard": 0}, {"count": [1]}) == Join.REQUESTED
    assert store.admit("c0")
    store.refuse_join("c1", "bad_stats", "3 features")
    assert [r.llen(store.k.answered(c)) for c in ("c0", "c1", "c2")] == [1, 1, 0]
    assert store.wait_admitted("c0", timeout=5) == Join.JOINED
    assert store.wait_admitted("c1", timeout=5) == "bad_stats: 3 features"
    assert not r.exists(store.k.answered("c0")) and not r.exists(store.k.answered("c1"))  # taken by the look


def test_simulate_spreads_clients_over_a_process_per_hundred() -> None:
    assert default_processes(10) == 4
    assert default_processes(1000) == 4
    assert default_processes(1001) == 5


def test_a_round_opened_by_its_drivers_commit_costs_no_look(harness_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after a driver's commit every client fetches the model and pushes at once: the next
    round waits on the inbox straight away (no look at the members or their keys), and the
    updates pushed before that wait are still folded, exactly once."""
    h = harness_factory(4, "t-open")
    sent: list[tuple[str, ...]] = []  # the aggregator thread's sends from round 2 on, as command names
    original = AbstractConnection.send_packed_command

    def logged(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        if threading.current_thread() is h.thread:
            sent.append(_names(command))
        original(self, command, check_health)

    _, names, g = h.global_model()
    for round_no in (1, 2, 3, 4):
        if round_no == 2:  # every script has run once (and is loaded): the sends are the steady state
            monkeypatch.setattr(AbstractConnection, "send_packed_command", logged)
        for k in range(3):  # each round's pushes land while the aggregator commits the last one
            update = h.update(f"c{k}", round_no, 10 + k, noisy(g, 10 * round_no + k), names)
            assert h.push(f"c{k}", round_no, update) == Push.OK
        h.wait_round(round_no)
    commits = [i for i, s in enumerate(sent) if "COMMIT" in s]
    assert len(commits) == 3, sent  # rounds 2, 3 and 4
    for first, second in itertools.pairwise(commits):
        opening = sent[first + 1:next(i for i in range(first + 1, second) if "READ_UPDATE" in sent[i])]
        assert all(set(s) <= {"BLPOP", "DRAIN", "XADD"} for s in opening), opening  # wait, then read
    assert [m["num_updates"] for m in h.store.metrics()] == [3, 3, 3, 3]
    assert h.store.state()["status"] == "finished"
