"""The run's lease and every write it fences: a driver takes the lease, and opening training,
closing a round, committing a round or a buffered version, ending evaluation and failing the
run each check in Redis that it still holds it (LeaseLost when another driver took over)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedq.errors import FedqError
from fedq.protocol import keys, scripts
from fedq.protocol.replies import opt_text
from fedq.protocol.run_records import MAX_EVENTS, RunRecords
from fedq.protocol.vocabulary import Event, Phase, Status


class LeaseLost(FedqError):
    """This aggregator no longer holds the run's lease; another one drives it now."""


@dataclass(frozen=True)
class Commit:
    """One round's commit, by name: RunStore.commit_round writes it all in one atomic step."""

    round: int
    global_payload: bytes  # the next global model (or the head of its parts, written before)
    metrics: dict[str, Any]  # the round's record
    after: Phase = Phase.TRAIN  # TRAIN: the next round opens; EVAL: final evaluation; DONE: the run ends
    final: dict[str, Any] | None = None  # the run's final record (with DONE)
    keep_updates: bool = False  # keep the round's updates (and their parts) for audit
    server_state: bytes | None = None  # the strategy's server optimiser state after this round
    next_selected: list[str] | None = None  # the clients chosen for the next round (sampled runs)
    previous_metrics: dict[str, Any] | None = None  # the previous round's record, now with its federated evaluation
    update_parts: Sequence[str] = ()  # parts of the round's updates sent in parts (deleted with them)
    stale_parts: Sequence[str] = ()  # global-model parts no head refers to any more (always deleted)
    model_file: bytes | None = None  # the final model as a .keras file (with the last round's commit)
    members: Sequence[str] | None = None  # the run's members, as the close looked at them (None: read them)


@dataclass(frozen=True)
class VersionCommit:
    """One buffered version's commit, by name: RunStore.commit_version writes it in one step."""

    version: int
    global_payload: bytes  # the new version's model (whole: buffered runs keep versions whole)
    metrics: dict[str, Any]  # the version's record
    folded: Mapping[tuple[str, int], str]  # (client, round) -> sequence number of each update folded
    after: Phase = Phase.TRAIN
    final: dict[str, Any] | None = None
    keep_updates: bool = False
    server_state: bytes | None = None
    drop: Sequence[str] = ()  # keys out of the staleness window: old model copies, consumed hashes
    model_file: bytes | None = None  # the final model as a .keras file (with the last version's commit)


class FencedSteps(RunRecords):
    """The lease, and the driver's writes it fences."""

    def acquire_lease(self, driver: str, ttl: float) -> bool:
        """Take the run's lease if nobody holds it; this store then fences its writes with it."""
        if self.r.set(self.k.lease, driver, nx=True, px=int(ttl * 1000)):
            self.driver = driver
            return True
        return False

    def lease_holder(self) -> str | None:
        return opt_text(self.r.get(self.k.lease))

    def renew_lease(self, ttl: float) -> None:
        """Extend our lease; LeaseLost when another driver holds it (or nobody does)."""
        if not self._call(scripts.RENEW, keys=[self.k.lease], args=[self.driver or "", int(ttl * 1000)]):
            raise LeaseLost(f"run {self.run_id}: lease lost (now held by {self.lease_holder()!r})")

    def release_lease(self) -> bool:
        """Give the lease up so that a standby takes over at once."""
        done = bool(self._call(scripts.RELEASE, keys=[self.k.lease, self.k.events],
                               args=[self.driver or "", MAX_EVENTS]))
        self.driver = None
        return done

    def mark_started(self, driver: str) -> None:
        """Running under driver; started_at is the first start only (a resume sets resumed_at)."""
        now = time.time()
        first = self.r.hsetnx(self.k.state, "started_at", now)
        self.r.hset(self.k.state, mapping={"status": Status.RUNNING, "driver": driver, "updated_at": now,
                                           **({} if first else {"resumed_at": now})})
        self.r.xadd(self.k.events, {"event": Event.STARTED, "driver": driver}, maxlen=MAX_EVENTS, approximate=True)

    def open_training(self, scaler: bytes, initial_global: bytes, selected: list[str] | None = None) -> bool:
        """Write the scaler and the initial global model and open round 1, atomically
        (with round 1's chosen clients when rounds sample them)."""
        named = {"driver": self.driver or "", "now": time.time(), "events_max": MAX_EVENTS, "selected": selected}
        done = self._call(scripts.OPEN_TRAINING,
                          keys=[self.k.state, self.k.scaler, self.k.global_model, self.k.inbox,
                                self.k.events, self.k.lease, self.k.selected(1)],
                          args=[json.dumps(named), scaler, initial_global])
        if done == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before training opened")
        return bool(done)

    def close_round(self, round_no: int) -> None:
        """Refuse further pushes for the round (fenced by the lease)."""
        if self._call(scripts.CLOSE, keys=[self.k.state, self.k.lease], args=[round_no, self.driver or ""]) == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before closing round {round_no}")

    def commit_round(self, commit: Commit) -> bool:
        """Commit a round in one atomic step (see Commit for what it carries); False when the
        run is not at the round before it (a replay, or a round already committed). Fenced by
        the lease: LeaseLost if another aggregator took the run over meanwhile."""
        self.audit.flush(self.r)  # the round's judgements before its commit (none wait, after a close)
        members = self.member_ids() if commit.members is None else commit.members
        updates = [key for cid in members for key in self.update_keys(cid, commit.round)]
        updates += [self.k.taken_seqs(commit.round), *commit.update_parts]
        named = {"round": commit.round, "driver": self.driver or "", "now": time.time(), "events_max": MAX_EVENTS,
                 "keep_updates": commit.keep_updates, "updates": len(updates), "after": commit.after,
                 "final": json.dumps(commit.final or {}), "next_selected": commit.next_selected,
                 "previous_metrics": "" if commit.previous_metrics is None else json.dumps(commit.previous_metrics)}
        done = self._staged_call(
            scripts.COMMIT, self.k.global_staged, commit.global_payload,
            keys=[self.k.state, self.k.global_model, self.k.metrics, self.k.inbox, self.k.events,
                  self.k.lease, self.k.server_state, self.k.selected(commit.round), self.k.selected(commit.round + 1),
                  self.k.model_file, self.k.global_staged, *updates, *commit.stale_parts],
            args=[json.dumps(named), json.dumps(commit.metrics), commit.server_state or b"", commit.model_file or b""])
        if done != 1:  # refused: the staged model stays behind (a driver's MULTI moves its own at once)
            self.r.delete(self.k.global_staged)
        if done == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before committing round {commit.round}")
        ok = bool(done)
        if ok and commit.after == Phase.DONE:
            self.r.xadd(keys.EVENTS, {"event": Event.FINISHED, "run": self.run_id}, maxlen=MAX_EVENTS,
                        approximate=True)
        return ok

    def update_keys(self, client_id: str, round_no: int) -> tuple[str, str, str, str]:
        """A client's update keys for a round that a commit deletes: its hash, its body (a
        version pushed and not taken), the version the aggregator took (and its bytes in
        transit, should a read have stopped halfway)."""
        return (self.k.update(client_id, round_no), self.k.update_body(client_id, round_no),
                self.k.update_taken(client_id, round_no), self.k.update_sent(client_id, round_no))

    def commit_version(self, commit: VersionCommit) -> bool:
        """Commit a buffered version in one atomic step (scripts.COMMIT_VERSION); False when the
        run is not at the version before it. Fenced by the lease like commit_round."""
        self.audit.flush(self.r)
        folded = [(cid, seq) for (cid, _round), seq in commit.folded.items()]
        per_update = [key for (cid, rnd) in commit.folded
                      for key in (self.k.update(cid, rnd), self.k.consumed(rnd), self.k.update_body(cid, rnd),
                                  self.k.update_taken(cid, rnd), self.k.taken_seqs(rnd))]
        named = {"round": commit.version, "driver": self.driver or "", "now": time.time(), "events_max": MAX_EVENTS,
                 "keep_updates": commit.keep_updates, "folded": folded, "after": commit.after,
                 "final": json.dumps(commit.final or {})}
        done = self._staged_call(
            scripts.COMMIT_VERSION, self.k.global_staged, commit.global_payload,
            keys=[self.k.state, self.k.global_model, self.k.metrics, self.k.inbox, self.k.events, self.k.lease,
                  self.k.server_state, self.k.version_model(commit.version), self.k.model_file, self.k.global_staged,
                  *per_update, *commit.drop],
            args=[json.dumps(named), json.dumps(commit.metrics), commit.server_state or b"", commit.model_file or b""])
        if done != 1:
            self.r.delete(self.k.global_staged)
        if done == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before committing version {commit.version}")
        if done and commit.after == Phase.DONE:
            self.r.xadd(keys.EVENTS, {"event": Event.FINISHED, "run": self.run_id}, maxlen=MAX_EVENTS,
                        approximate=True)
        return bool(done)

    def keep_version(self, version: int, payload: bytes) -> None:
        """Keep a copy of the committed model of this version unless one is kept already (a
        resumed driver's first step: every driver would write the same bytes)."""
        self.r.set(self.k.version_model(version), payload, nx=True)

    def finish_evaluation(self, round_no: int, last_metrics: dict[str, Any] | None,
                          final: dict[str, Any]) -> bool:
        """End the final-evaluation phase and the run (fenced by the lease)."""
        done = self._call(
            scripts.FINISH_EVAL,
            keys=[self.k.state, self.k.metrics, self.k.inbox, self.k.events, self.k.lease,
                  self.k.selected(round_no + 1), *[self.k.evaluation(cid) for cid in self.member_ids()]],
            args=[json.dumps({"round": round_no, "now": time.time(), "events_max": MAX_EVENTS,
                              "driver": self.driver or "", "final": json.dumps(final),
                              "last_metrics": "" if last_metrics is None else json.dumps(last_metrics)})])
        if done == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before finishing round {round_no}'s evaluation")
        if done:
            self.r.xadd(keys.EVENTS, {"event": Event.FINISHED, "run": self.run_id}, maxlen=MAX_EVENTS,
                        approximate=True)
        return bool(done)

    def fail(self, reason: str) -> bool:
        """Mark the run failed with a reason that clients, CLI and dashboard show.

        A driver only fails a run while it holds the lease; others (fedq run, tests) always may."""
        self.audit.flush(self.r)
        named = {"reason": reason, "now": time.time(), "events_max": MAX_EVENTS, "driver": self.driver or ""}
        done = self._call(scripts.FAIL, keys=[self.k.state, self.k.lease, self.k.events], args=[json.dumps(named)])
        if done == -1:
            return False
        self.r.xadd(keys.EVENTS, {"event": Event.FAILED, "run": self.run_id}, maxlen=MAX_EVENTS, approximate=True)
        return True
