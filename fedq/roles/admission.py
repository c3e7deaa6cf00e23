"""Admission: clients' join requests become members, or refusals with a reason.

``Admission`` is the part of the aggregator that deals with who takes part (fedq.roles.aggregator
drives the rounds around it). A client files a join request under its own key (RunStore.join:
its record and feature statistics); only the aggregator writes the member set (RunStore.admit),
so ids pushed into the inbox, or anywhere else, by somebody cannot take an honest client's
place. In the join phase every request's statistics are checked and the run opens when all its
clients are in (or the quorum at the deadline); while training runs, a request is admitted while
the run has room (the client uses the published scaler).

A client's join step also adds its id to the run's set of waiting requests (keys.RunKeys.joins),
so that an idle moment looks at a bounded sample of that set rather than scanning the keyspace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedq.errors import DataError
from fedq.learning.scaling import FeatureStats, combine_stats, scaler_from_stats
from fedq.learning.spec import RunSpec
from fedq.protocol.signing import Verifier
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Refusal
from fedq.roles.judging import Round

log = logging.getLogger("fedq.roles.aggregator")


class Admission:
    """The aggregator's admission of clients (mixed into fedq.roles.aggregator.Aggregator)."""

    run_id: str
    store: RunStore
    verifier: Verifier | None
    _swept_joins: bool = False  # this driving session has looked at every join key once
    _join_rows: dict[str, int | None]  # member -> the rows it joined with, read once (_joined)

    if TYPE_CHECKING:  # the Aggregator's (and Collecting's), used here
        # Raise when the run vanished from Redis.
        def _check_exists(self) -> None: ...
        # Renew the lease (when due) and honour stop requests. Admission calls it once per request
        # judged: a look at a thousand waiting requests takes longer than a lease, and ADMIT is
        # fenced by it.
        def _tick(self) -> None: ...
        # Block until the run's clients answered, or the quorum at a deadline.
        def _wait_quorum(self, spec: RunSpec, what: str, have: Callable[[], int], on_idle: Callable[[], None],
                         on_wake: Callable[[str], None]) -> None: ...

    # --- the join phase --------------------------------------------------------------------
    def _collect_joins(self, spec: RunSpec, num_features: int) -> tuple[np.ndarray, np.ndarray]:
        """Admit clients that asked to join with valid statistics, until all the run's clients
        are in (or the quorum at the deadline). Returns the scaler's mean and std."""
        good: dict[str, FeatureStats] = {}
        turned_away: set[str] = set()

        def judge(cid: str) -> None:
            if cid in good or cid in turned_away:
                return
            self._tick()
            stats = self._join_stats(spec, cid, num_features)
            if stats is None:
                return
            if self.store.admit(cid):
                good[cid] = stats
            else:
                turned_away.add(cid)
                log.warning("run %s: client %s asked to join a full run", self.run_id, cid)

        def scan() -> None:  # idle moments look at the waiting requests: wake-ups are only hints
            self._check_exists()
            for cid in self._waiting_requests():
                judge(cid)  # ticks: the lease is renewed through a long look

        scan()
        self._wait_quorum(spec, "joining", lambda: len(good), scan, judge)
        return scaler_from_stats(combine_stats(list(good.values())))

    def _join_stats(self, spec: RunSpec, cid: str, num_features: int) -> FeatureStats | None:
        """The statistics of cid's join request when it may be admitted; None when it filed none
        (a wake-up naming nobody costs one small read) or was refused (recorded)."""
        request = self.store.join_request(cid)
        if request is None:
            return None
        if not self._registered(cid) or not self._shard_plan_agrees(spec, cid, request[0]):
            return None
        try:
            stats = FeatureStats.from_dict(request[1])
            if len(stats.count) != num_features:
                raise DataError(f"{len(stats.count)} features, the run's data has {num_features}")
        except (DataError, TypeError, KeyError, ValueError) as exc:
            log.warning("run %s: refusing client %s: bad statistics: %s", self.run_id, cid, exc)
            self.store.refuse_join(cid, Refusal.BAD_STATS, str(exc))
            return None
        return stats

    def _waiting_requests(self) -> list[str]:
        """Ids of clients whose join request waits, taken off the run's set of them (a bounded
        read, whatever the size of the keyspace). The first look of a driving session sweeps
        every join key instead (SCAN): a request taken by a driver that stopped before judging
        it is in no set any more."""
        taken = self.store.take_join_requests()
        if self._swept_joins:
            return taken
        self._swept_joins = True
        return sorted(set(taken) | set(self.store.join_requests()))

    # --- checks every request passes --------------------------------------------------------
    def _registered(self, cid: str) -> bool:
        """With a client registry (signed updates), only its clients may join; others are refused."""
        if self.verifier is None or self.verifier.knows(cid):
            return True
        log.warning("run %s: refusing client %s: not in the client registry", self.run_id, cid)
        self.store.refuse_join(cid, Refusal.UNKNOWN_KEY,
                               f"client {cid!r} is not in the client registry (FEDQ_CLIENT_KEYS)")
        return False

    def _shard_plan_agrees(self, spec: RunSpec, cid: str, record: dict[str, Any]) -> bool:
        """A client dealing itself a shard of the run's data must use the run's shard count
        (one shard per client); others overlap or skip rows. Clients with rows of their own
        (own_data) shard as they please."""
        n = record.get("num_shards")
        if record.get("own_data") is True or n is None or n == spec.clients:
            return True
        detail = f"--num-shards {n!r} does not match the run's {spec.clients} shards (one per client)"
        log.warning("run %s: refusing client %s: %s", self.run_id, cid, detail)
        self.store.refuse_join(cid, Refusal.SHARD_PLAN, detail)
        return False

    # --- while training runs ----------------------------------------------------------------
    def _admit_waiting(self, spec: RunSpec, rnd: Round) -> None:
        """An idle moment of a round: admit clients that asked to join, while there is room."""
        if len(rnd.joined) >= spec.clients:
            return
        for cid in self._waiting_requests():  # each is admitted, or answered (run full, refused)
            if cid not in rnd.joined:
                self._admit_late(spec, rnd, cid)

    def _admit_woken(self, spec: RunSpec, rnd: Round, cid: str) -> None:
        """A wake-up during a round from a client that is no member: perhaps a join request."""
        if cid not in rnd.joined and len(rnd.joined) < spec.clients:
            self._admit_late(spec, rnd, cid)

    def _admit_late(self, spec: RunSpec, rnd: Round, cid: str) -> None:
        """A client asking to join while training runs: admitted while there is room (it uses
        the published scaler and trains from the next round it sees)."""
        self._tick()
        request = self.store.join_request(cid)
        if request is not None and self._registered(cid) \
                and self._shard_plan_agrees(spec, cid, request[0]) and self.store.admit(cid):
            log.info("run %s: admitted %s while training", self.run_id, cid)
            self._join_rows.pop(cid, None)  # admitted (again): its record as it asked now
            rnd.joined = self._joined()

    def _joined(self, ids: list[str] | None = None) -> dict[str, int | None]:
        """Member id -> the rows it joined with (None when it stated no valid count); ids: the
        member ids when the caller has just seen them (else they are read).

        A member's join record is read once, when it is first seen a member: the rows it was
        admitted with are its claim for the run (the record is the client's own key, which it
        may rewrite at any time). Each round then costs one look at the member set instead of
        three round trips over every member's record (two of them on the round's critical path)."""
        ids = self.store.member_ids() if ids is None else ids
        known = self._join_rows
        for gone in set(known) - set(ids):
            del known[gone]
        new = [cid for cid in ids if cid not in known]
        for cid, rec in (self.store.clients(new) if new else {}).items():
            rows = rec.get("rows")
            known[cid] = rows if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0 else None
        return {cid: known[cid] for cid in ids if cid in known}
