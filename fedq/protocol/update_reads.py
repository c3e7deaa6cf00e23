"""What the driving aggregator reads of clients' pushes: the inbox that wakes it, each update
version checked in Redis before it travels, and the refusals and judgements it records."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis

from fedq.protocol import scripts
from fedq.protocol.fencing import LeaseLost
from fedq.protocol.replies import opt_text, raise_any, text, valid_client_id
from fedq.protocol.run_records import MAX_REFUSED, RunRecords
from fedq.protocol.vocabulary import Read

DRAIN_BATCH = 10_000  # inbox entries drained per call


@dataclass(frozen=True)
class StoredUpdate:
    """What RunStore.read_update found: kind is ok, none, seen, or what is wrong with the key."""

    kind: Read
    seq: str = ""
    payload: bytes | None = None
    parts: str = ""
    size: int = 0

    @property
    def version(self) -> str:
        """The version this is (see version_marker)."""
        return version_marker(self.kind, self.seq)


def version_marker(kind: Read, seq: str) -> str:
    """What names one version of a client's stored update, so that each is judged once: its push
    sequence number whenever the key carries a valid one (whatever else is wrong with it), else a
    marker naming what is wrong with the key. RunStore.update_seqs (a cheap look) and the update
    guard (a read) name a version alike, so a rescan finds nothing new in a version judged."""
    if kind == Read.WRONG_TYPE:
        return "!wrong_type"
    if kind == Read.BAD_SEQ:
        return "!bad_seq:" + seq[:32]
    return seq


def seq_marker(reply: Any) -> str:
    """The version marker of an update from its 'seq' field as HGET replied (an error: the key
    is of another type)."""
    if isinstance(reply, Exception):
        return version_marker(Read.WRONG_TYPE, "")
    text = opt_text(reply) or ""
    return version_marker(Read.OK if text.isdigit() and len(text) <= 15 else Read.BAD_SEQ, text)


class Closed(NamedTuple):
    """What a round's close saw: the members, the version markers of their updates, and how many
    of the members the caller named had a live heartbeat."""

    members: list[str]
    seqs: dict[str, str]
    alive: int


class UpdateReads(RunRecords):
    """The aggregator's reads of what clients pushed, and its records of them."""

    def _ask_seqs(self, pipe: Any, round_no: int, ids: Sequence[str]) -> None:
        """Queue the look at each client's update sequence number (read with _seqs)."""
        for cid in ids:
            pipe.hget(self.k.update(cid, round_no), "seq")

    def _ask_alive(self, pipe: Any, ids: Sequence[str]) -> None:
        """Queue one command counting the ids with a live heartbeat (read with _alive): an EXISTS
        of their heartbeat keys, or of the spec when there are none, so that the replies after
        it stay in place."""
        pipe.exists(*[self.k.alive(c) for c in ids]) if ids else pipe.exists(self.k.spec)

    def pop_inbox(self, block_seconds: float) -> list[str]:
        """The distinct client ids that woke us (in order), or [] after block_seconds.

        One round trip: BLPOP and the drain go in one pipeline (Redis runs the drain as soon as
        the BLPOP returns), so the first id and whatever queued behind it come back together;
        duplicates and entries that cannot be ids are dropped in Redis."""
        pipe = self.r.pipeline(transaction=False)
        self.audit.into(pipe)  # judgements waiting ride along (audit.py)
        pipe.blpop([self.k.inbox], timeout=block_seconds)
        # evalsha directly: a pipeline running a Script object asks SCRIPT EXISTS first (a trip more)
        pipe.evalsha(self._script(scripts.DRAIN).sha, 1, self.k.inbox, DRAIN_BATCH)
        replies = pipe.execute(raise_on_error=False)
        raise_any(replies[:-2])
        item, drained = replies[-2:]
        if isinstance(item, Exception):
            raise item
        if isinstance(drained, Exception):  # the script not loaded yet (or Redis restarted): load it
            if not isinstance(drained, redis.exceptions.NoScriptError):
                raise drained
            drained = self._call(scripts.DRAIN, keys=[self.k.inbox], args=[DRAIN_BATCH])
        rest = [opt_text(x) or "" for x in drained]  # pushed in the instant after a BLPOP that timed out, too
        if item is None:
            return rest
        first = opt_text(item[1]) or ""
        rest = [i for i in rest if i != first]
        return [first, *rest] if len(first) <= 64 else rest

    def _read_keys(self, round_no: int, client_id: str) -> list[str]:
        """READ_UPDATE's KEYS for a client's update of the round (see scripts.READ_UPDATE)."""
        return [self.k.update(client_id, round_no), self.k.update_body(client_id, round_no),
                self.k.update_sent(client_id, round_no), self.k.update_taken(client_id, round_no),
                self.k.taken_seqs(round_no)]

    def read_update(self, round_no: int, client_id: str, judged: str, max_bytes: int,
                    only: str = "") -> StoredUpdate:
        """A client's stored update for the round, checked in Redis before anything travels: its
        type, its sequence number, its size (against max_bytes); judged is the sequence number
        already judged, whose payload is then not sent again (kind 'seen'). only, when given, is
        the one sequence number that may be read: any other version is kind 'capped', unread
        (checked and read in one step, so that no push can slip in between)."""
        if not valid_client_id(client_id):
            return StoredUpdate(Read.NONE)
        return self._read(round_no, {client_id: (judged, only)}, max_bytes)[client_id]

    def read_updates(self, round_no: int, asks: Sequence[tuple[str, str]], max_bytes: int) -> dict[str, StoredUpdate]:
        """read_update of many clients in one round trip: asks are (client id, judged) pairs, each
        read as read_update reads it (with no only). Client id -> what was found (ids that cannot
        be clients are left out; a repeated id is read once)."""
        asked: dict[str, tuple[str, str]] = {}
        for cid, judged in asks:
            if valid_client_id(cid):
                asked.setdefault(cid, (judged, ""))
        return self._read(round_no, asked, max_bytes)

    def _read(self, round_no: int, asks: dict[str, tuple[str, str]], max_bytes: int) -> dict[str, StoredUpdate]:
        """The reads of read_update and read_updates: asks are client id -> (judged, only). All go
        in one MULTI, each client's step followed by the GET of the bytes it moved and their move
        to the taken key, so that no push runs in between, on a retry too (_after_audit: when
        Redis had not loaded the step, none ran and nothing moved)."""
        def steps(pipe: Any, sha: str) -> None:
            for cid, (judged, only) in asks.items():
                keys = self._read_keys(round_no, cid)
                pipe.evalsha(sha, len(keys), *keys, judged, max_bytes, only, cid)
                pipe.get(keys[2])  # present only when the step found bytes to send
                pipe.rename(keys[2], keys[3])

        replies = self._after_audit(scripts.READ_UPDATE, steps, atomic=True)
        return {cid: _stored(cid, replies[3 * i], replies[3 * i + 1]) for i, cid in enumerate(asks)}

    def update_seq(self, round_no: int, client_id: str) -> str:
        """The version marker of a client's stored update (see update_seqs)."""
        return self.update_seqs(round_no, [client_id]).get(client_id, "")

    def update_seqs(self, round_no: int, ids: Sequence[str] | None = None) -> dict[str, str]:
        """Client id -> version marker of its stored update for the round: the push sequence
        number, or a marker naming what is wrong with the key (so that it is judged once)."""
        ids = self.member_ids() if ids is None else [c for c in ids if valid_client_id(c)]
        pipe = self.r.pipeline(transaction=False)
        self._ask_seqs(pipe, round_no, ids)
        return _seqs(ids, pipe.execute(raise_on_error=False))

    def first_look(self, round_no: int, ids: Sequence[str]) -> tuple[bool, int, dict[str, str]]:
        """A round's first look, in one round trip: whether the run still exists, how many of
        ids have a live heartbeat, and update_seqs of ids (updates pushed before it opened for
        the aggregator: a resumed round's, or the quick clients')."""
        ids = [c for c in ids if valid_client_id(c)]
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(self.k.spec)
        self._ask_alive(pipe, ids)
        self._ask_seqs(pipe, round_no, ids)
        replies = pipe.execute(raise_on_error=False)
        raise_any(replies[:2])
        return bool(replies[0]), _alive(ids, replies[1]), _seqs(ids, replies[2:])

    def close_and_look(self, round_no: int, ids: Sequence[str]) -> Closed:
        """Close the round (fenced by the lease, as FencedSteps.close_round), then look at what was
        stored before the close, in one round trip when ids (the members as the caller knows them)
        are all the members: the member ids, update_seqs of them, and how many of ids have a live
        heartbeat (the next round opens from this look, without one of its own)."""
        ids = [c for c in ids if valid_client_id(c)]

        def close_then_look(pipe: Any, sha: str) -> None:
            pipe.evalsha(sha, 2, self.k.state, self.k.lease, round_no, self.driver or "")
            pipe.smembers(self.k.members)
            self._ask_alive(pipe, ids)
            self._ask_seqs(pipe, round_no, ids)

        closed, *replies = self._after_audit(scripts.CLOSE, close_then_look)
        raise_any([closed])
        if closed == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before closing round {round_no}")
        members = sorted(cid for cid in map(text, replies[0]) if valid_client_id(cid))
        alive = _alive(ids, replies[1])
        seqs = {cid: seq for cid, seq in _seqs(ids, replies[2:]).items() if cid in members}
        others = [cid for cid in members if cid not in ids]
        if others:  # members the caller did not know of: a second look
            seqs.update(self.update_seqs(round_no, others))
        return Closed(members, seqs, alive)

    def record_refused(self, client_id: str, round_no: int, reason: str, detail: str) -> None:
        rec = {"client": client_id, "round": round_no, "reason": reason, "detail": detail,
               "time": time.time(), "stage": "aggregate"}
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(self.k.refused, json.dumps(rec))
        pipe.ltrim(self.k.refused, -MAX_REFUSED, -1)
        pipe.execute()

    def record_judged(self, client_id: str, round_no: int, seq: str, digest: str, outcome: str,
                      nbytes: int) -> None:
        """Append one judgement to the audit trail (it travels with this store's next call: audit.py)."""
        self.audit.record(client_id, round_no, seq, digest, outcome, nbytes)


def _stored(client_id: str, reply: Any, body: Any) -> StoredUpdate:
    """What READ_UPDATE answered for a client (its reply, and the GET of the bytes it moved)."""
    if isinstance(reply, Exception):
        raise reply
    kind = Read(opt_text(reply[0]) or Read.NONE)
    seq = (opt_text(reply[1]) or "") if len(reply) > 1 else ""
    if kind == Read.OK:
        if isinstance(body, Exception) or body is None:
            raise redis.exceptions.ResponseError(f"the update read of {client_id} sent no bytes")
        return StoredUpdate(kind, seq, body or None, opt_text(reply[2]) or "")
    if kind == Read.TOO_LARGE:
        return StoredUpdate(kind, seq, size=int(reply[2]))
    return StoredUpdate(kind, seq)


def _alive(ids: Sequence[str], reply: Any) -> int:
    """How many of ids have a live heartbeat, from the reply of UpdateReads._ask_alive."""
    return int(reply) if ids else 0


def _seqs(ids: Sequence[str], replies: Sequence[Any]) -> dict[str, str]:
    """Client id -> version marker, from the replies of UpdateReads._ask_seqs (absent keys left out)."""
    return {cid: seq_marker(v) for cid, v in zip(ids, replies) if v is not None}
