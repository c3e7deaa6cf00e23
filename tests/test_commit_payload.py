"""What a round's commit writes, exactly: for each phase after it (train, eval, done), every key
the commit touches is read back from a real Redis and compared whole.

test_guarantees checks when a commit applies (fencing, ordering); this checks what it leaves
behind when it does: the final record, the next round's chosen clients, the previous round's
record with its federated evaluation, kept or deleted updates, the server state, and the run's
and the global event streams (finished, failed). The Lua mutants at the end patch the commit
step's writes one at a time; each must fail a test here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from support.lua import assert_killed, mutant_failures

from fedq.protocol import keys
from fedq.protocol.fencing import Commit
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Phase

RUN = "t-commit"


class _Spec:
    def __init__(self, rounds: int) -> None:
        self.rounds, self.clients = rounds, 2

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "clients": self.clients}


def _training(r: redis.Redis, rounds: int = 3) -> RunStore:
    """A run training round 1 with members c0 and c1, round 1 sampling c0 only."""
    store = RunStore(r, RUN)
    store.create(_Spec(rounds))
    assert store.acquire_lease("driver", 30)
    for cid in ("c0", "c1"):
        assert store.join(cid, {"shard": 0}, {}) == "requested"
        assert store.admit(cid)
    assert store.open_training(b"scaler", b"global-0", selected=["c0"])
    return store


def _round_inputs(store: RunStore, round_no: int) -> dict[str, str]:
    """What a round leaves for its commit: an update from c0 (sent in one part), a wake-up and a
    global-model part two rounds old. Returns the keys by role."""
    k, r = store.k, store.r
    part = k.update_part("c0", round_no, "p1", 0)
    store.put_part(part, b"part")
    assert store.push_update("c0", round_no, b"update", 1000, part_id="p1") == "ok"
    stale = k.global_part(round_no - 2, 0)
    r.set(stale, b"old global part")
    taken = store.read_update(round_no, "c0", "", 1000)  # the aggregator takes the version it judges
    assert (taken.kind, taken.payload) == ("ok", b"update")
    return {"update": k.update("c0", round_no), "taken": k.update_taken("c0", round_no),
            "taken seqs": k.taken_seqs(round_no), "part": part, "stale": stale}


def _commit(store: RunStore, round_no: int, after: Phase = Phase.TRAIN, **extra: Any) -> dict[str, str]:
    inputs = _round_inputs(store, round_no)
    commit = Commit(round=round_no, global_payload=f"global-{round_no}".encode(),
                    metrics={"round": round_no, "num_updates": 1}, after=after,
                    update_parts=[inputs["part"]], stale_parts=[inputs["stale"]], **extra)
    assert store.commit_round(commit) is True
    return inputs


def _events(r: redis.Redis, stream: str) -> list[dict[str, str]]:
    return [{f.decode(): v.decode() for f, v in fields.items()} for _id, fields in r.xrange(stream)]


def _state(store: RunStore) -> dict[str, str]:
    """The state hash without the times the steps stamp (checked on their own)."""
    return {f: v for f, v in store.state().items() if not f.endswith("_at")}


def _global_events(r: redis.Redis) -> list[str]:
    return [e["event"] for e in _events(r, keys.EVENTS) if e.get("run") == RUN]


def test_a_commit_that_opens_the_next_round(r: redis.Redis) -> None:
    store = _training(r)
    inputs = _commit(store, 1, next_selected=["c1", "c0"], server_state=b"momentum")
    k = store.k
    assert store.global_payload() == b"global-1"
    assert _state(store) == {"status": "running", "phase": "train", "round": "1", "rounds": "3", "clients": "2",
                             "queue": ""}
    assert "final" not in store.state() and "finished_at" not in store.state()
    assert store.metrics() == [{"round": 1, "num_updates": 1}]
    assert not any(r.exists(key) for key in inputs.values())  # the update, what was taken, its part, the stale part
    assert not r.exists(k.global_staged)  # moved into place
    assert not r.exists(k.selected(1)) and store.selected(2) == {"c0", "c1"}
    assert store.server_state_payload() == b"momentum"
    assert not r.exists(k.inbox)
    assert _events(r, k.events)[-1] == {"event": "round", "round": "1"}
    assert _global_events(r) == ["created"]


def test_a_commit_that_keeps_its_updates_for_audit(r: redis.Redis) -> None:
    store = _training(r)
    inputs = _commit(store, 1, keep_updates=True)
    assert r.get(inputs["taken"]) == b"update" and r.get(inputs["part"]) == b"part"
    assert r.hget(inputs["update"], "seq") == b"1" and r.hget(inputs["taken seqs"], "c0") == b"1"
    assert store.selected(1) == {"c0"}  # the round's chosen clients stay with its updates
    assert not r.exists(inputs["stale"])  # a global part no head refers to goes whatever is kept


def test_without_chosen_clients_or_server_state_nothing_of_them_is_written(r: redis.Redis) -> None:
    store = _training(r)
    r.set(store.k.server_state, b"round 0's")
    _commit(store, 1)
    assert not r.exists(store.k.selected(2))
    assert store.server_state_payload() == b"round 0's"  # no new state: the last one stays


def test_the_previous_record_gains_its_federated_evaluation(r: redis.Redis) -> None:
    store = _training(r)
    _commit(store, 1)
    _commit(store, 2, previous_metrics={"round": 1, "num_updates": 1, "fed_eval_accuracy": 0.5})
    assert store.metrics() == [{"round": 1, "num_updates": 1, "fed_eval_accuracy": 0.5},
                               {"round": 2, "num_updates": 1}]
    _commit(store, 3, after=Phase.DONE, final={"round": 3})  # none given: the record stays as it is
    assert store.metrics()[1:] == [{"round": 2, "num_updates": 1}, {"round": 3, "num_updates": 1}]


def test_a_commit_that_opens_the_final_evaluation(r: redis.Redis) -> None:
    store = _training(r, rounds=1)
    _commit(store, 1, after=Phase.EVAL, next_selected=["c1"])
    assert _state(store) == {"status": "running", "phase": "eval", "round": "1", "rounds": "1", "clients": "2",
                             "queue": ""}
    assert "final" not in store.state() and "finished_at" not in store.state()
    assert store.selected(2) == {"c1"}  # the clients chosen to evaluate
    assert [e["event"] for e in _events(r, store.k.events)][-2:] == ["round", "evaluate"]
    assert _events(r, store.k.events)[-1] == {"event": "evaluate", "round": "1"}
    assert _global_events(r) == ["created"]


def test_the_last_commit_finishes_the_run_with_its_final_record(r: redis.Redis) -> None:
    store = _training(r, rounds=1)
    final = {"round": 1, "test_accuracy": 0.75, "test_loss": 0.5}
    keras_zip = b"PK\x03\x04 a .keras file"
    _commit(store, 1, after=Phase.DONE, final=final, model_file=keras_zip)
    state = store.state()
    assert json.loads(state["final"]) == final
    assert store.model_file() == keras_zip
    assert (state["status"], state["phase"], state["round"]) == ("finished", "done", "1")
    assert float(state["finished_at"]) == float(state["updated_at"]) > 0
    assert [e["event"] for e in _events(r, store.k.events)][-2:] == ["round", "finished"]
    assert _events(r, store.k.events)[-1] == {"event": "finished", "round": "1"}
    assert _global_events(r) == ["created", "finished"]
    assert _events(r, keys.EVENTS)[-1] == {"event": "finished", "run": RUN}


def test_a_last_commit_without_a_final_record_writes_an_empty_one(r: redis.Redis) -> None:
    store = _training(r, rounds=1)
    _commit(store, 1, after=Phase.DONE)
    assert store.state()["final"] == "{}"
    assert not r.exists(store.k.model_file)  # none given: none written


def test_finishing_the_evaluation_writes_the_last_record_and_the_final_one(r: redis.Redis) -> None:
    store = _training(r, rounds=1)
    _commit(store, 1, after=Phase.EVAL, next_selected=["c0"])
    assert store.push_eval("c0", 1, b"evaluation", 1000) == "ok"
    last = {"round": 1, "num_updates": 1, "fed_eval_accuracy": 0.9}
    assert store.finish_evaluation(1, last, {"round": 1, "fed_eval_accuracy": 0.9})
    state = store.state()
    assert (state["status"], state["phase"]) == ("finished", "done")
    assert json.loads(state["final"]) == {"round": 1, "fed_eval_accuracy": 0.9}
    assert store.metrics() == [last]
    assert not r.exists(store.k.evaluation("c0")) and not r.exists(store.k.selected(2))
    assert _events(r, store.k.events)[-1] == {"event": "finished", "round": "1"}
    assert _events(r, keys.EVENTS)[-1] == {"event": "finished", "run": RUN}


def test_a_failed_run_says_so_on_both_streams(r: redis.Redis) -> None:
    store = _training(r)
    assert store.fail("out of patience")
    state = store.state()
    assert (state["status"], state["phase"], state["reason"]) == ("failed", "done", "out of patience")
    assert _events(r, store.k.events)[-1] == {"event": "failed", "reason": "out of patience"}
    assert _global_events(r) == ["created", "failed"]
    assert _events(r, keys.EVENTS)[-1] == {"event": "failed", "run": RUN}


# --- hand-written mutants of the commit step's writes --------------------------------------------

MUTANTS: dict[str, tuple[str, str, str]] = {
    "no global model": ("COMMIT", r"redis\.call\('RENAME', KEYS\[11\], KEYS\[2\]\)", "local _ = 0"),
    "no round counter": ("COMMIT", r"'round', a\.round, 'updated_at'", "'updated_at'"),
    "previous record not replaced": ("COMMIT", r"redis\.call\('LSET', KEYS\[3\], -1, a\.previous_metrics\)",
                                     "local _ = 0"),
    "previous record replaced when absent": ("COMMIT", r"a\.previous_metrics ~= '' and ", ""),
    "no round record": ("COMMIT", r"redis\.call\('RPUSH', KEYS\[3\], ARGV\[2\]\)", "local _ = 0"),
    "updates always kept": ("COMMIT", r"if not a\.keep_updates then", "if false then"),
    "updates never kept": ("COMMIT", r"if not a\.keep_updates then", "if true then"),
    "chosen clients kept": ("COMMIT", r"redis\.call\('DEL', KEYS\[8\]\)", "local _ = 0"),
    "stale parts kept": ("COMMIT", r"for i = last_update \+ 1, #KEYS", "for i = last_update + 2, #KEYS"),
    "last update kept": ("COMMIT", r"for i = 12, last_update do", "for i = 12, last_update - 1 do"),
    "first update kept": ("COMMIT", r"for i = 12, last_update do", "for i = 13, last_update do"),
    "done and eval swapped": ("COMMIT", r"if a\.after == PHASE_DONE then", "if a.after == PHASE_EVAL then"),
    "inbox kept": ("COMMIT", r"redis\.call\('DEL', KEYS\[4\]\)", "local _ = 0"),
    "server state dropped": ("COMMIT", r"then redis\.call\('SET', KEYS\[7\], ARGV\[3\]\) end", "then end"),
    "server state blanked": ("COMMIT", r"if ARGV\[3\] ~= '' then", "if true then"),
    "next chosen clients dropped": ("COMMIT", r"redis\.call\('SADD', KEYS\[9\], id\)", "local _ = id"),
    "no round event": ("COMMIT", r"'event', EVENT_ROUND", "'event', EVENT_EVALUATE"),
    "done: not finished": ("COMMIT", r"'status', STATUS_FINISHED, 'phase', PHASE_DONE",
                           "'status', STATUS_RUNNING, 'phase', PHASE_DONE"),
    "done: no final record": ("COMMIT", r", 'final', a\.final\)", ")"),
    "done: no finished event": ("COMMIT", r"'event', EVENT_FINISHED", "'event', EVENT_ROUND"),
    "eval: phase not moved": ("COMMIT", r"redis\.call\('HSET', KEYS\[1\], 'phase', PHASE_EVAL\)", "local _ = 0"),
    "eval: no evaluate event": ("COMMIT", r"'event', EVENT_EVALUATE, 'round'", "'event', EVENT_ROUND, 'round'"),
    "finish_eval: last record not replaced": ("FINISH_EVAL", r"redis\.call\('LSET', KEYS\[2\], -1, a\.last_metrics\)",
                                              "local _ = 0"),
    "finish_eval: no final record": ("FINISH_EVAL", r"'updated_at', a\.now, 'final', a\.final\)",
                                     "'updated_at', a.now)"),
    "finish_eval: evaluations kept": ("FINISH_EVAL", r"for i = 7, #KEYS", "for i = 8, #KEYS"),
    "model file dropped": ("COMMIT", r"if ARGV\[4\] ~= '' then redis\.call\('SET', KEYS\[10\], ARGV\[4\]\) end",
                           "local _ = 0"),
    "model file always written": ("COMMIT", r"if ARGV\[4\] ~= '' then redis\.call\('SET', KEYS\[10\]",
                                  "if true then redis.call('SET', KEYS[10]"),
    "fail: not failed": ("FAIL", r"'status', STATUS_FAILED", "'status', STATUS_RUNNING"),
}

CHECKS: list[Callable[[redis.Redis], None]] = [
    test_a_commit_that_opens_the_next_round, test_a_commit_that_keeps_its_updates_for_audit,
    test_without_chosen_clients_or_server_state_nothing_of_them_is_written,
    test_the_previous_record_gains_its_federated_evaluation, test_a_commit_that_opens_the_final_evaluation,
    test_the_last_commit_finishes_the_run_with_its_final_record,
    test_a_last_commit_without_a_final_record_writes_an_empty_one,
    test_finishing_the_evaluation_writes_the_last_record_and_the_final_one, test_a_failed_run_says_so_on_both_streams,
]


def test_the_unmutated_scripts_pass_every_check(r: redis.Redis) -> None:
    assert mutant_failures(r, CHECKS) == []


@pytest.mark.parametrize("mutant", MUTANTS)
def test_each_lua_mutant_fails_a_payload_test(r: redis.Redis, monkeypatch: pytest.MonkeyPatch, mutant: str) -> None:
    assert_killed(r, monkeypatch, MUTANTS, mutant, CHECKS)
