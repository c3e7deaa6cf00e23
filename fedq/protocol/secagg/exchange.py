"""The secure-aggregation stages over Redis: keys under each client's prefix, records the aggregator publishes.

Client: writes ``keys`` -> reads the ``roster`` -> writes ``shares`` -> reads ``sharers`` -> masks
its input (pushed as its update) -> reads ``survivors`` and its ``inbox`` -> writes ``reveal``.
Aggregator: collects the keys and publishes the roster; collects the shares and publishes who
shared and each client's inbox; after the masked inputs, publishes the survivors, collects the
reveals and unmasks. Each client message is followed by its id on the hint list (the aggregator
blocks on it); each published record by an event on the run's stream (clients block on it).
Nothing waits without a timeout, and a deadline passed is a ``SecAggError``, never a guess.

A driver that takes a round over (its predecessor died mid-round) adopts every record the
predecessor published instead of publishing its own: clients shared against that roster and
revealed for those survivors, so anything else would unmask against a view no client had. If
the masked inputs it holds are not the published survivors, the round fails by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import redis

from fedq.errors import ConfigError, SecAggError
from fedq.protocol import guarded
from fedq.protocol.fencing import LeaseLost
from fedq.protocol.keys import RunKeys
from fedq.protocol.secagg import wire
from fedq.protocol.secagg.graph import neighbours
from fedq.protocol.secagg.params import SecAggParams
from fedq.protocol.secagg.participant import Advert, Participant
from fedq.protocol.secagg.unmasking import RoundRecord, Unmasked, unmask
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Event

T = TypeVar("T")
TTL_SECONDS = 24 * 3600  # a round's messages outlive any round; the commit deletes them sooner
MAX_EVENTS = 10_000

# The aggregator's publication, fenced by its lease: a former driver (paused, partitioned) cannot
# publish a roster or survivors over its successor's.
# KEYS[1]: lease; KEYS[2]: events; KEYS[3..]: the records
# ARGV[1]: driver ('' when not driving under a lease); ARGV[2]: ttl seconds; ARGV[3]: events cap;
# ARGV[4]: round; ARGV[5]: stage; ARGV[6..]: the records' values, in KEYS[3..]'s order
# Returns 1 (published) or -1 (lease lost).
PUBLISH = f"""
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
for i = 3, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 3], 'EX', ARGV[2]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', '{Event.SECAGG}', 'round', ARGV[4], 'stage', ARGV[5])
return 1
"""


@dataclass
class ClientExchange:
    """One client's stages of one round, over Redis."""

    r: redis.Redis
    k: RunKeys
    me: Participant
    block_seconds: float = 1.0
    timeout: float = 3600.0
    sharers: dict[str, bytes] = field(default_factory=dict)
    # False once waiting is pointless (the round was committed or the run ended): stop at once.
    still_waiting: Callable[[], bool] | None = None
    _last_event: str = "0-0"

    def _post(self, stage: str, payload: bytes) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.k.secagg(self.me.me, self.me.round_no, stage), payload, ex=TTL_SECONDS)
        pipe.rpush(self.k.secagg_hints, self.me.me)
        pipe.execute()

    def _await(self, key: str, what: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        cap = wire.record_cap(wire.MAX_CLIENTS)
        while True:
            (raw,) = guarded.strings(self.r, [key], cap)
            if raw is not None:
                return raw
            if time.monotonic() > deadline:
                raise SecAggError("timeout", f"{self.me.me}: no {what} for round {self.me.round_no} "
                                             f"within {self.timeout:g} s")
            if self.still_waiting is not None and not self.still_waiting():
                raise SecAggError("round_ended", f"{self.me.me}: round {self.me.round_no} ended before its {what}")
            self._last_event, _ = RunStore(self.r, self.k.run_id).wait_event(self._last_event, self.block_seconds)

    def prepare(self) -> None:
        """Stages keys and shares (they need no input: a client may run them before it trains)."""
        rnd = self.me.round_no
        self._post("keys", wire.encode_keys(self.me.advertise()))
        params, seed, roster = wire.decode_roster(self._await(self.k.secagg_public(rnd, "roster"), "roster"))
        if params != self.me.params:
            raise SecAggError("bad_roster", f"the roster's parameters {params} are not the run's {self.me.params}")
        commitment, bundles = self.me.share(roster, seed)
        self._post("shares", wire.encode_shares(commitment, bundles))
        self.sharers = wire.decode_sharers(self._await(self.k.secagg_public(rnd, "sharers"), "sharers"))

    def mask(self, x: np.ndarray) -> np.ndarray:
        """Stage mask: this client's masked input for the round (after ``prepare``)."""
        if not self.sharers:
            raise SecAggError("not_prepared", f"{self.me.me}: mask before the keys and shares stages")
        return self.me.masked(x, self.sharers)

    def reveal(self) -> None:
        """Stage reveal: once the survivors are published, this client's shares for them."""
        rnd = self.me.round_no
        survivors = wire.decode_survivors(self._await(self.k.secagg_public(rnd, "survivors"), "survivors"))
        (raw,) = guarded.strings(self.r, [self.k.secagg_inbox(rnd, self.me.me)], wire.record_cap(wire.MAX_CLIENTS))
        inbox = wire.decode_inbox(raw) if raw is not None else {}
        self._post("reveal", wire.encode_reveal(self.me.reveal(survivors, self.sharers, inbox)))


@dataclass
class Coordinator:
    """The aggregator's stages of one round, over Redis (its memory: keys, shares, one sum)."""

    r: redis.Redis
    k: RunKeys
    round_no: int
    params: SecAggParams
    graph_seed: bytes
    block_seconds: float = 1.0
    refused: dict[str, str] = field(default_factory=dict)  # client -> why its message was refused
    record: RoundRecord | None = None
    cap: int = 0  # the most bytes a client's message may take (set by setup)
    driver: str = ""  # the lease holder publishing (fenced by the run's lease); '' unfenced
    tick: Callable[[], None] | None = None  # called between waits (the aggregator renews its lease)
    # Of the clients still awaited, those that cannot answer any more (their heartbeat expired):
    # a stage stops waiting once only such clients are left.
    gone: Callable[[list[str]], set[str]] | None = None
    adopted: list[str] = field(default_factory=list)  # the records a previous driver had published

    def _publish(self, what: str, payload: bytes, extra: Mapping[str, bytes] | None = None) -> None:
        records = {**(extra or {}), self.k.secagg_public(self.round_no, what): payload}
        done = self.r.register_script(PUBLISH)(
            keys=[self.k.lease, self.k.events, *records],
            args=[self.driver, TTL_SECONDS, MAX_EVENTS, self.round_no, what, *records.values()])
        if done == -1:
            raise LeaseLost(f"run {self.k.run_id}: lease lost before publishing the secure-aggregation {what}")

    def _published(self, what: str) -> bytes | None:
        """A record of this round a driver published already (a takeover adopts it), or None."""
        (raw,) = guarded.strings(self.r, [self.k.secagg_public(self.round_no, what)], wire.record_cap(wire.MAX_CLIENTS))
        if raw is not None:
            self.adopted.append(what)
        return raw

    def _collect(self, stage: str, wanted: Collection[str], decode: Callable[[str, bytes], T],
                 deadline: float) -> dict[str, T]:
        """Each wanted client's decoded message; a bad one is refused (with its reason) and not waited for."""
        got: dict[str, T] = {}
        while True:
            missing = [c for c in sorted(wanted) if c not in got and c not in self.refused]
            raws = guarded.strings(self.r, [self.k.secagg(c, self.round_no, stage) for c in missing], self.cap)
            for cid, raw in zip(missing, raws):
                if raw is None:
                    continue
                try:
                    got[cid] = decode(cid, raw)
                except SecAggError as exc:
                    self.refused[cid] = str(exc)  # the decoders name the stage and the field
            left = [c for c in missing if c not in got and c not in self.refused]
            if not left or time.monotonic() > deadline or (self.gone is not None and set(left) <= self.gone(left)):
                return got
            if self.tick is not None:
                self.tick()
            self.r.blpop([self.k.secagg_hints], timeout=max(0.01, min(self.block_seconds, deadline - time.monotonic())))

    def setup(self, clients: Collection[str], deadline: float) -> dict[str, Advert]:
        """Collect the clients' keys and publish the roster (the graph's vertices)."""
        self.cap = wire.record_cap(len(clients))
        raw = self._published("roster")
        if raw is not None:
            params, seed, roster = wire.decode_roster(raw)
            if params != self.params or seed != self.graph_seed:
                raise SecAggError("bad_roster", f"round {self.round_no}'s published roster has other parameters "
                                                "or another graph seed than this run's")
        else:
            roster = self._collect("keys", clients, lambda _c, raw: wire.decode_keys(raw), deadline)
            if len({a.mask_public for a in roster.values()}) != len(roster):
                raise SecAggError("bad_roster", "two clients advertised the same key")
            try:
                self.params.check(len(roster))
            except ConfigError as exc:
                raise SecAggError("too_few_clients",
                                  f"{len(roster)} of {len(clients)} clients sent keys: {exc}") from None
            self._publish("roster", wire.encode_roster(self.params, self.graph_seed, roster))
        self.record = RoundRecord(self.k.run_id, self.round_no, self.params, roster, self.graph_seed, {})
        return roster

    def share(self, deadline: float) -> RoundRecord:
        """Collect each client's commitment and sealed shares; publish who shared and every inbox."""
        if self.record is None:
            raise SecAggError("out_of_order", "the share stage needs the roster: setup first")
        raw = self._published("sharers")
        commitments = wire.decode_sharers(raw) if raw is not None else self._share(self.record.roster, deadline)
        if not set(commitments) <= set(self.record.roster):
            raise SecAggError("bad_roster", f"round {self.round_no}'s published sharers are not in its roster")
        self.record = RoundRecord(self.k.run_id, self.round_no, self.params, self.record.roster, self.graph_seed,
                                  commitments)
        return self.record

    def _share(self, roster: Mapping[str, Advert], deadline: float) -> dict[str, bytes]:
        graph = neighbours(sorted(roster), self.params.neighbours, self.graph_seed)
        got = self._collect("shares", roster, lambda c, raw: wire.decode_shares(raw, graph[c]), deadline)
        inboxes: dict[str, dict[str, bytes]] = {c: {} for c in got}
        for owner, (_commit, bundles) in got.items():
            for peer, sealed in bundles.items():
                if peer in inboxes:
                    inboxes[peer][owner] = sealed
        extra = {self.k.secagg_inbox(self.round_no, c): wire.encode_inbox(b) for c, b in inboxes.items()}
        commitments = {c: v[0] for c, v in got.items()}
        self._publish("sharers", wire.encode_sharers(commitments), extra)
        return commitments

    def unmask(self, masked_sum: np.ndarray, survivors: Collection[str], deadline: float) -> Unmasked:
        """Publish the survivors, collect their reveals (until all, or the deadline) and unmask the sum."""
        if self.record is None or not self.record.commitments:
            raise SecAggError("out_of_order", "unmasking needs the sharers: share first")
        alive = sorted(survivors)
        t = self.params.reconstruction_threshold
        if len(alive) < t:  # fail before asking anyone for shares: a sum of fewer is not private
            raise SecAggError("too_few_survivors", f"{len(alive)} clients sent masked inputs, {t} needed")
        raw = self._published("survivors")
        if raw is None:
            self._publish("survivors", wire.encode_survivors(alive))
        elif sorted(wire.decode_survivors(raw)) != alive:
            published = sorted(wire.decode_survivors(raw))
            raise SecAggError("survivors_changed",
                              f"round {self.round_no}: the clients revealed their shares for the survivors "
                              f"{published}, but the masked inputs held are from {alive}")
        graph = self.record.graph()
        reveals = self._collect("reveal", alive, lambda c, raw: wire.decode_reveal(raw, graph[c] | {c}), deadline)
        return unmask(self.record, masked_sum, alive, reveals)
