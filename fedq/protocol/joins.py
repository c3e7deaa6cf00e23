"""Admission: the driving aggregator takes the run's waiting join requests, reads each, and
makes the client a member (fenced by the lease) or refuses it with a verdict the client reads."""

from __future__ import annotations

import json
from typing import Any

from fedq.protocol import guarded, scripts
from fedq.protocol.fencing import LeaseLost
from fedq.protocol.replies import json_object, text, valid_client_id
from fedq.protocol.run_records import MAX_EVENTS
from fedq.protocol.update_reads import UpdateReads
from fedq.protocol.vocabulary import Join

JOIN_BATCH = 100  # waiting join requests taken per call


class JoinSteps(UpdateReads):
    """The aggregator's side of joining."""

    def join_request(self, client_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(record, statistics) a client filed with join(), or None when it filed none or filed
        something that is not two JSON objects within the size cap (or the id is invalid)."""
        if not valid_client_id(client_id):
            return None
        [(record, stats)] = guarded.hash_fields(self.r, [self.k.joined(client_id)], ["record", "stats"])
        rec, st = json_object(record), json_object(stats)
        return None if rec is None or st is None else (rec, st)

    def join_requests(self, limit: int = 10_000) -> list[str]:
        """Ids of clients with a join hash in this run (members or not), found by SCAN: a sweep
        of the whole keyspace, for a driver taking a run up (take_join_requests is the cheap look)."""
        return [self.k.client_of(key) for key in self._client_keys("join", limit)]

    def take_join_requests(self, limit: int = JOIN_BATCH) -> list[str]:
        """Ids of clients whose join request waits (at most limit, in no order), taken off the
        run's set of them: the caller judges each (join_request reads it). A client that asks
        again meanwhile is added again. Entries that are no valid client id are dropped."""
        ids = [text(i) for i in self._call(scripts.WAITING_JOINS, keys=[self.k.joins], args=[limit])]
        if ids:
            self.r.srem(self.k.joins, *ids)
        return [cid for cid in ids if valid_client_id(cid)]

    def admit(self, client_id: str) -> bool:
        """Make a client that asked to join a member (fenced by the lease when driving);
        False when the run is full (the client finds that verdict under its join key)."""
        named = {"client": client_id, "driver": self.driver or "", "events_max": MAX_EVENTS,
                 "verdict": f"{Join.RUN_FULL}: the run has all its clients"}
        step_keys = [self.k.state, self.k.members, self.k.joined(client_id), self.k.lease, self.k.events,
                     self.k.answered(client_id)]
        done = self._call(scripts.ADMIT, keys=step_keys, args=[json.dumps(named)])
        if done == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost while admitting {client_id}")
        return bool(done)

    def refuse_join(self, client_id: str, reason: str, detail: str) -> None:
        """Refuse a join request: recorded with the run's refusals, and the verdict written under
        the client's join key (where its wait_admitted finds it); a member is dropped."""
        self.record_refused(client_id, 0, reason, detail)
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(self.k.members, client_id)
        pipe.delete(self.k.joined(client_id))
        pipe.hset(self.k.joined(client_id), "verdict", f"{reason}: {detail}"[:500])
        pipe.rpush(self.k.answered(client_id), client_id)  # wakes its wait_admitted
        pipe.execute()
