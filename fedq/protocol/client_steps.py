"""What a client does to a run: join and wait to be admitted, push updates (whole or in parts)
and evaluations; each checked in Redis by a Lua step (fedq.protocol.scripts)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from fedq.protocol import codec, scripts
from fedq.protocol.replies import opt_text
from fedq.protocol.run_records import MAX_PUSHES, MAX_REFUSED, RunRecords
from fedq.protocol.vocabulary import ENDED, Join, Status


class ClientSteps(RunRecords):
    """A client's writes to one run."""

    def join(self, client_id: str, record: dict[str, Any], stats: dict[str, Any]) -> str:
        """Ask to join with a record and feature statistics; returns requested (the aggregator
        admits: see wait_admitted), rejoined, or a refusal code."""
        named = {"client": client_id, "state": self.k.state, "members": self.k.members, "inbox": self.k.inbox,
                 "joins": self.k.joins}
        return opt_text(self._call(scripts.JOIN, keys=[self.k.joined(client_id)],
                                   args=[json.dumps(named), json.dumps(record), json.dumps(stats)])) or ""

    def wait_admitted(self, client_id: str, timeout: float, block_seconds: float = 1.0) -> str:
        """After join() answered requested: block until the aggregator admits the client
        ('joined') or refuses it (its reason), or the run ends; 'join_timeout' after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            # One look (MULTI), which also takes away any wake-up it covers: an answer given
            # after it pushes a new one. Clients wait on their own list, not on the run's
            # events: with hundreds joining at once, each admission woke every one of them.
            pipe = self.r.pipeline(transaction=True)
            pipe.sismember(self.k.members, client_id)
            pipe.hget(self.k.joined(client_id), "verdict")
            pipe.hget(self.k.state, "status")
            pipe.delete(self.k.answered(client_id))
            member, raw_verdict, raw_status, _ = pipe.execute()
            verdict, status = opt_text(raw_verdict), opt_text(raw_status)
            if member:
                return Join.JOINED
            if verdict:
                return verdict
            if status is None:
                return Join.NO_SUCH_RUN
            if status in ENDED:
                return Join.RUN_FINISHED if status == Status.FINISHED else Join.RUN_FAILED
            left = deadline - time.monotonic()
            if left <= 0:
                return Join.TIMEOUT
            # The run's end pushes no wake-up: a look every block_seconds finds it.
            self.r.blpop([self.k.answered(client_id)], timeout=max(0.01, min(block_seconds, left)))

    def join_and_wait(self, client_id: str, record: dict[str, Any], stats: dict[str, Any],
                      timeout: float = 60.0) -> str:
        """join(), then wait_admitted() when the request was filed: joined, rejoined or why not."""
        outcome = self.join(client_id, record, stats)
        return self.wait_admitted(client_id, timeout) if outcome == Join.REQUESTED else outcome

    def push_update(self, client_id: str, round_no: int, payload: bytes, max_bytes: int, part_id: str = "",
                    window: int = 0) -> str:
        """Store an update (or the head of one sent in parts, with its push id) for the open
        round; 'ok' or the refusal code (also recorded). window: how many versions behind the
        newest the round may be (buffered aggregation's max staleness; 0: the open round only)."""
        named = {"client": client_id, "round": int(round_no), "now": time.time(), "max_bytes": int(max_bytes),
                 "refused_max": MAX_REFUSED, "pushes_max": MAX_PUSHES, "digest": codec.digest(payload),
                 "part_id": part_id, "window": int(window), "state": self.k.state, "members": self.k.members,
                 "selected": self.k.selected(round_no), "consumed": self.k.consumed(round_no), "inbox": self.k.inbox}
        step_keys = [self.k.update(client_id, round_no), self.k.client_refused(client_id),
                     self.k.client_pushes(client_id), self.k.update_staged(client_id),
                     self.k.update_body(client_id, round_no)]
        reply = self._staged_call(scripts.PUSH, self.k.update_staged(client_id), payload, keys=step_keys,
                                  args=[json.dumps(named)])
        return opt_text(reply) or ""

    def refuse_push(self, client_id: str, round_no: int, reason: str, detail: str) -> str:
        """Record a push the client refused itself before sending (too large in parts)."""
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.k.client_pushes(client_id), {"client": client_id, "round": round_no, "digest": "",
                                                    "outcome": reason, "bytes": 0},
                  maxlen=MAX_PUSHES, approximate=True)
        pipe.rpush(self.k.client_refused(client_id), json.dumps(
            {"client": client_id, "round": round_no, "reason": reason, "detail": detail, "time": now,
             "stage": "push"}))
        pipe.ltrim(self.k.client_refused(client_id), -MAX_REFUSED, -1)
        pipe.execute()
        return reason

    def put_part(self, key: str, payload: bytes) -> None:
        """Store one part of a model sent in parts (before the head that lists it)."""
        self.r.set(key, payload)

    def drop_parts(self, part_keys: Iterable[str]) -> None:
        """Delete parts no head refers to any more."""
        batch = list(part_keys)
        for i in range(0, len(batch), 1000):
            self.r.delete(*batch[i:i + 1000])

    def part_id(self, client_id: str, round_no: int) -> str:
        """Push id of the client's stored update for the round ('' when it travelled whole)."""
        return opt_text(self.r.hget(self.k.update(client_id, round_no), "parts")) or ""

    def push_eval(self, client_id: str, round_no: int, payload: bytes, max_bytes: int) -> str:
        """Store a client's evaluation of the last global model; 'ok' or the refusal code (recorded)."""
        named = {"client": client_id, "round": int(round_no), "now": time.time(), "max_bytes": int(max_bytes),
                 "refused_max": MAX_REFUSED, "state": self.k.state, "members": self.k.members,
                 "selected": self.k.selected(round_no + 1), "inbox": self.k.inbox}
        step_keys = [self.k.evaluation(client_id), self.k.client_refused(client_id)]
        return opt_text(self._call(scripts.PUSH_EVAL, keys=step_keys, args=[json.dumps(named), payload])) or ""
