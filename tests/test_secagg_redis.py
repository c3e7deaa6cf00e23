"""Secure-aggregation stages over a real Redis: clients in threads, the aggregator's coordinator, hostile keys."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import redis

from fedq.errors import SecAggError
from fedq.protocol.keys import RunKeys
from fedq.protocol.secagg import wire
from fedq.protocol.secagg.exchange import ClientExchange, Coordinator
from fedq.protocol.secagg.masking import add_into
from fedq.protocol.secagg.params import SecAggParams
from fedq.protocol.secagg.participant import Participant
from fedq.protocol.secagg.quantise import encode_input
from fedq.protocol.secagg.unmasking import RoundRecord, Unmasked

EVERYONE = SecAggParams.from_options(neighbours=6, threshold=4)  # 7 clients, each everyone's neighbour
FIVE = SecAggParams.from_options(neighbours=4, threshold=3)  # the same, once two of the 7 are refused
IDS = [f"client-{i}" for i in range(7)]


def _client(r: redis.Redis, k: RunKeys, params: SecAggParams, cid: str, x: np.ndarray, masked: dict[str, np.ndarray],
            stop_after: str | None, errors: list[BaseException]) -> Callable[[], None]:
    def run() -> None:
        try:
            ex = ClientExchange(r, k, Participant(k.run_id, 1, cid, params), block_seconds=0.1, timeout=20)
            if stop_after == "absent":
                return
            if stop_after == "late":  # its keys come only once the roster is out (too late for it)
                ex._await(k.secagg_public(1, "roster"), "roster")
                ex._post("keys", wire.encode_keys(ex.me.advertise()))
                return
            if stop_after == "keys":
                ex._post("keys", wire.encode_keys(ex.me.advertise()))
                return
            ex.prepare()
            if stop_after == "shares":
                return
            y = ex.mask(x)
            masked[cid] = y  # the push of the masked update (the update path carries it in fedq)
            r.rpush(k.secagg_hints, cid)
            if stop_after != "mask":
                ex.reveal()
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)
    return run


def _round(r: redis.Redis, params: SecAggParams, stops: dict[str, str],
           hostile: Callable[[RunKeys], None] | None = None, stage_seconds: float = 1.0,
           takeover: Callable[[Coordinator, set[str]], Coordinator] | None = None,
           ) -> tuple[Unmasked, dict[str, np.ndarray], dict[str, np.ndarray], Coordinator]:
    """One round; with ``takeover``, its driver is replaced (by what ``takeover`` returns, given the
    old driver and the clients whose masked input is in) after the masked inputs arrived."""
    k = RunKeys("secagg-run")
    rng = np.random.default_rng(7)
    inputs = {c: encode_input([rng.normal(0, 1, (20, 3))], 10 + i, params) for i, c in enumerate(IDS)}
    masked: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_client(r, k, params, c, inputs[c], masked, stops.get(c), errors), daemon=True)
               for c in IDS]
    for t in threads:
        t.start()
    if hostile:
        hostile(k)
    co = Coordinator(r, k, 1, params, b"graph-seed-0123456789", block_seconds=0.1)
    # Each stage waits for everyone it expects, or stage_seconds when someone dropped.
    co.setup(IDS, time.monotonic() + stage_seconds)
    co.share(time.monotonic() + stage_seconds)
    deadline = time.monotonic() + 20
    want = {c for c in IDS if stops.get(c) not in ("keys", "shares", "absent", "late")}
    while set(masked) != want and time.monotonic() < deadline:
        r.blpop([k.secagg_hints], timeout=0.1)
    if takeover is not None:
        co = takeover(co, set(masked))
        co.setup(IDS, time.monotonic() + stage_seconds)
        co.share(time.monotonic() + stage_seconds)
    total = np.zeros(61, np.uint32)
    for y in masked.values():
        add_into(total, y)
    got = co.unmask(total, set(masked), time.monotonic() + stage_seconds)
    for t in threads:
        t.join(20)
    assert not errors, errors
    return got, inputs, masked, co


def test_a_round_over_redis_unmasks_exactly_the_survivors_sum(r: redis.Redis) -> None:
    stops = {"client-1": "keys", "client-2": "shares", "client-3": "mask"}
    got, inputs, masked, co = _round(r, EVERYONE, stops)
    assert set(masked) == {"client-0", "client-3", "client-4", "client-5", "client-6"}
    want = np.sum([inputs[c].astype(np.uint64) for c in masked], axis=0).astype(np.uint32)
    assert np.array_equal(got.total, want) and co.refused == {}
    # Nothing any key holds is a plain input, or carries one inside.
    for key in r.scan_iter("*"):
        kind = r.type(key)
        values = [r.get(key)] if kind == b"string" else r.lrange(key, 0, -1) if kind == b"list" else []
        for v in values:
            assert all(inputs[c].tobytes()[:64] not in (v or b"") for c in IDS), key


def test_hostile_messages_are_refused_by_name_and_the_round_goes_on(r: redis.Redis) -> None:
    def forge(k: RunKeys) -> None:
        # client-1 and client-2 never run: something else writes their keys, of a bad shape or type.
        r.set(k.secagg("client-1", 1, "keys"), b"\x93junk")
        r.hset(k.secagg("client-2", 1, "keys"), "x", "y")  # a hash where a string belongs: read as absent
        r.rpush(k.secagg_hints, "client-1", "client-2")

    got, inputs, masked, co = _round(r, FIVE, {"client-1": "absent", "client-2": "absent"}, forge)
    assert co.record is not None and sorted(co.record.roster) == sorted(set(IDS) - {"client-1", "client-2"})
    assert co.refused == {"client-1": "malformed: keys: not msgpack (ExtraData)"}
    want = np.sum([inputs[c].astype(np.uint64) for c in masked], axis=0).astype(np.uint32)
    assert len(masked) == 5 and np.array_equal(got.total, want)


def test_too_few_clients_fail_the_round_by_name(r: redis.Redis) -> None:
    co = Coordinator(r, RunKeys("secagg-run"), 1, FIVE, b"graph-seed-0123456789", block_seconds=0.05)
    with pytest.raises(SecAggError, match="too_few_clients: 0 of 7 clients sent keys"):
        co.setup(IDS, time.monotonic() + 0.3)


def test_too_few_survivors_fail_before_anyone_is_asked_for_shares(r: redis.Redis) -> None:
    k = RunKeys("secagg-run")
    co = Coordinator(r, k, 1, FIVE, b"graph-seed-0123456789", block_seconds=0.05)
    with pytest.raises(SecAggError, match="out_of_order: unmasking needs the sharers"):
        co.unmask(np.zeros(3, np.uint32), ["client-0"], time.monotonic())
    co.record = _record_of_five(k)
    with pytest.raises(SecAggError, match="too_few_survivors: 2 clients sent masked inputs, 3 needed"):
        co.unmask(np.zeros(3, np.uint32), ["client-0", "client-1"], time.monotonic() + 1)
    assert r.get(k.secagg_public(1, "survivors")) is None


def _record_of_five(k: RunKeys) -> RoundRecord:
    ps = {c: Participant(k.run_id, 1, c, FIVE) for c in IDS[:5]}
    roster = {c: p.advertise() for c, p in ps.items()}
    commitments = {c: p.share(roster, b"graph-seed-0123456789")[0] for c, p in ps.items()}
    return RoundRecord(k.run_id, 1, FIVE, roster, b"graph-seed-0123456789", commitments)


def _successor(old: Coordinator) -> Coordinator:
    return Coordinator(old.r, old.k, old.round_no, old.params, old.graph_seed, block_seconds=0.1)


def test_a_driver_taking_over_mid_round_adopts_what_was_published(r: redis.Redis) -> None:
    # client-6's keys arrive after the first driver published the roster: a successor that
    # collected the keys again would unmask against a graph no client masked with.
    roster_events: list[int] = []

    def die(old: Coordinator, _masked: set[str]) -> Coordinator:
        assert old.record is not None and "client-6" not in old.record.roster
        assert r.get(old.k.secagg("client-6", 1, "keys")) is not None  # the late keys are there to be taken
        roster_events.append(r.xlen(old.k.events))
        return _successor(old)

    got, inputs, masked, co = _round(r, FIVE, {"client-6": "late", "client-2": "mask"}, takeover=die)
    assert co.adopted == ["roster", "sharers"] and r.xlen(co.k.events) == roster_events[0] + 1  # + survivors
    assert co.record is not None and "client-6" not in co.record.roster
    want = np.sum([inputs[c].astype(np.uint64) for c in masked], axis=0).astype(np.uint32)
    assert set(masked) == set(IDS) - {"client-6"} and np.array_equal(got.total, want)


def test_a_successor_holding_other_inputs_than_the_published_survivors_fails_by_name(r: redis.Redis) -> None:
    def die_after_survivors(old: Coordinator, masked: set[str]) -> Coordinator:
        old._publish("survivors", wire.encode_survivors(sorted(masked - {"client-0"})))
        return _successor(old)

    with pytest.raises(SecAggError, match=r"survivors_changed: round 1: the clients revealed their shares for "
                                          r"the survivors \['client-1'"):
        _round(r, FIVE, {}, takeover=die_after_survivors)
