"""Collecting a round: wait for the expected clients' updates (or a deadline with the quorum,
or until everyone still due is gone), judging each as it arrives, then close the round
(``Collecting``, mixed into fedq.roles.aggregator.Aggregator)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import redis

from fedq.errors import RoundTimeout
from fedq.learning.spec import RunSpec
from fedq.learning.strategies import Strategy
from fedq.protocol import heartbeat, messages
from fedq.protocol.store import RunStore
from fedq.roles import metrics as fedq_metrics
from fedq.roles import secure
from fedq.roles.judging import Round
from fedq.settings import Settings

log = logging.getLogger("fedq.roles.aggregator")

LIVENESS_CHECK_SECONDS = 0.5  # how often a round due updates looks at its members' heartbeats


class Collecting:
    """The aggregator's waiting for a round's updates (mixed into Aggregator)."""

    r: redis.Redis
    run_id: str
    settings: Settings
    store: RunStore
    _seen_alive: set[str]

    if TYPE_CHECKING:
        def _tick(self) -> None: ...
        def _check_exists(self) -> None: ...
        def _joined(self, ids: list[str] | None = None) -> dict[str, int | None]: ...
        def _admit_waiting(self, spec: RunSpec, rnd: Round) -> None: ...
        def _admit_woken(self, spec: RunSpec, rnd: Round, cid: str) -> None: ...
        def _consider(self, rnd: Round, round_no: int, cid: str, template: list[messages.TensorSpec]) -> None: ...
        def _consider_all(self, rnd: Round, round_no: int, ids: list[str], template: list[messages.TensorSpec],
                          before: Callable[[str], None] | None = None) -> None: ...
        def _cap_shares(self, spec: RunSpec, rnd: Round, round_no: int,
                        template: list[messages.TensorSpec]) -> None: ...

    def _wait_quorum(self, spec: RunSpec, what: str, have: Callable[[], int], on_idle: Callable[[], None],
                     on_wake: Callable[[str], None], expected: int | None = None, quorum: int | None = None,
                     settled: Callable[[int], bool] | None = None,
                     on_woken: Callable[[list[str]], None] | None = None) -> None:
        """Block until all expected clients answered, or a deadline passes with at least the quorum,
        or settled(quorum) says nobody else can answer (the rest are gone) with the quorum in.

        expected and quorum default to the run's; a round that samples clients expects only those.
        on_woken, when given, takes the ids of each wake-up together, instead of on_wake each.
        Below the quorum at a deadline, wait again (spec.round_retries times), then fail."""
        expected = spec.clients if expected is None else expected
        quorum = spec.quorum if quorum is None else quorum
        deadline = time.monotonic() + spec.round_timeout
        retries = spec.round_retries
        while have() < expected and not (settled is not None and settled(quorum)):
            self._tick()
            if time.monotonic() > deadline:
                got = have()
                if got >= quorum:
                    log.warning("run %s: %s: deadline passed with %d of %d; closing with the quorum (%d)",
                                self.run_id, what, got, expected, quorum)
                    return
                if retries == 0:
                    raise RoundTimeout(f"{what}: only {got} of {expected} (quorum {quorum}) after "
                                       f"{spec.round_timeout:g} s and {spec.round_retries} more waits")
                retries -= 1
                deadline = time.monotonic() + spec.round_timeout
                log.warning("run %s: %s: %d of %d, below the quorum of %d; waiting again (%d waits left)",
                            self.run_id, what, got, expected, quorum, retries)
            woken = self.store.pop_inbox(self.settings.block_seconds)
            if not woken:
                on_idle()
            elif on_woken is not None:
                on_woken(woken)
                continue
            for cid in woken:
                self._tick()  # a wake-up may name hundreds (a join phase): keep the lease through them
                on_wake(cid)

    def _collect_round(self, spec: RunSpec, round_no: int, template: list[messages.TensorSpec],
                       strategy: Strategy, base: list[np.ndarray], opened: list[str] | None = None) -> Round:
        """Block until every joined (or chosen) client has a stored update for the round (valid or
        refused), or the deadline passes with the quorum. strategy has begun the round; base is
        the global model it started from (compressed updates are deltas from it). opened: the
        members as this driver's close of the previous round saw them, when it committed that
        round itself; the round then opens without a look of its own."""
        rnd = self._open_round(spec, round_no, template, strategy, base, opened)

        def rescan(joined_now: bool = False) -> None:
            # Wake-ups are hints; the sequence numbers are the truth. An idle moment re-reads
            # them, so a wake-up lost to a dropped connection costs a second, not the round.
            if joined_now:
                # The round's first look, one round trip (while clients train and push, each
                # trip waits for a CPU): the members were read a moment ago, not again. A member
                # without a readable join record is looked at by the next idle rescan, or its wake-up.
                exists, alive, seqs = self.store.first_look(round_no, sorted(rnd.joined))
                if not exists:
                    self._check_exists()
            else:
                self._check_exists()
                rnd.joined = self._joined()  # late joiners count from now on
                alive = heartbeat.count_alive_clients(self.r, self.run_id, sorted(rnd.joined))
            fedq_metrics.set_clients_alive(alive)
            self._admit_waiting(spec, rnd)
            if not joined_now:
                seqs = self.store.update_seqs(round_no)
            self._consider_all(rnd, round_no, _changed(rnd, seqs), template)

        def woken(cid: str) -> None:
            self._admit_woken(spec, rnd, cid)
            self._consider(rnd, round_no, cid, template)

        def all_woken(ids: list[str]) -> None:  # their updates read many to a round trip
            self._consider_all(rnd, round_no, ids, template, before=lambda cid: self._admit_woken(spec, rnd, cid))

        if opened is None:
            rescan(joined_now=True)  # a resumed round: fold what is already stored
        else:
            # This driver's own commit opened the round: every update of it was pushed after
            # that, and each push put its client in the inbox, which the wait drains first. The
            # round's start, when every client fetches the model and pushes at once, costs no
            # round trip to Redis here.
            self._admit_waiting(spec, rnd)
        expected = rnd.expected(spec)
        self._wait_quorum(spec, f"round {round_no}", lambda: rnd.responded, rescan, woken,
                          expected=expected, quorum=min(spec.quorum, expected),
                          settled=lambda quorum: self._settled(rnd, quorum), on_woken=all_woken)
        # Close the round, then take in whatever was stored before the close: after this no
        # push can change it, so what we commit is exactly what was accepted. One round trip.
        rnd.members, seqs, alive = self.store.close_and_look(round_no, sorted(rnd.joined))
        fedq_metrics.set_clients_alive(alive)
        self._consider_all(rnd, round_no, _changed(rnd, seqs), template)
        if not rnd.folded:
            raise RoundTimeout(f"round {round_no}: every update was refused")
        self._cap_shares(spec, rnd, round_no, template)
        return rnd

    def _open_round(self, spec: RunSpec, round_no: int, template: list[messages.TensorSpec],
                    strategy: Strategy, base: list[np.ndarray], opened: list[str] | None = None) -> Round:
        """The round's state as it opens: the members (opened: as the last close saw them), and
        the clients that may train in it (those chosen, in a sampled round; with secure
        aggregation, those that shared keys)."""
        rnd = Round(acc=strategy, joined=self._joined(opened), base=base, compression=spec.compression,
                    template=template)
        if spec.sampled:
            rnd.selected = self.store.selected(round_no)
            if rnd.selected is None:  # written with the commit that opened the round; never absent
                raise RoundTimeout(f"round {round_no}: the clients chosen to train are missing from Redis")
        sharers = secure.eligible(strategy)  # secure aggregation: only a client that shared can be unmasked
        if sharers is not None:
            rnd.selected = sharers if rnd.selected is None else rnd.selected & sharers
        return rnd

    def _settled(self, rnd: Round, quorum: int) -> bool:
        """Whether the round can close before its deadline: the quorum is in and every member
        still due an update is gone (its heartbeat, seen before, has expired). Slow but live
        clients keep the round open until the deadline; members are looked up every half second."""
        if rnd.responded < quorum:
            return False
        now = time.monotonic()
        if now - rnd.checked_alive < LIVENESS_CHECK_SECONDS:
            return rnd.settled
        rnd.checked_alive = now
        due = sorted(c for c in (rnd.selected if rnd.selected is not None else rnd.joined)
                     if c not in rnd.folded and c not in rnd.refused)
        beats = heartbeat.client_heartbeats(self.r, self.run_id, due)
        self._seen_alive.update(beats)
        rnd.gone = {c for c in due if c in self._seen_alive and c not in beats}
        rnd.settled = set(due) <= rnd.gone
        if rnd.settled and due:
            log.warning("run %s: closing the round without %s: heartbeat expired", self.run_id, ", ".join(due))
        return rnd.settled


def _changed(rnd: Round, seqs: dict[str, str]) -> list[str]:
    """The clients whose stored update (seqs: client id -> version marker) is a version not judged yet."""
    return [cid for cid, seq in seqs.items() if rnd.versions.get(cid) != seq]
