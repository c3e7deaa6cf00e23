"""Federated evaluation: the clients' evaluations of a global model on their own held-out rows.

``FederatedEvaluation`` is the part of the aggregator that reads them (fedq.roles.aggregator
drives the rounds around it): each round's updates carry the clients' evaluation of the global
model they trained from, which the commit adds to the previous round's record; after the last
round the clients evaluate the last global model, and the run finishes with their combination.
Every evaluation is a client's claim: checked against the rows it joined with, or refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedq.errors import RoundTimeout, UpdateRejected
from fedq.learning import evaluation
from fedq.learning.spec import RunSpec
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Refusal
from fedq.roles import record
from fedq.roles.judging import Round

log = logging.getLogger("fedq.roles.aggregator")


class FederatedEvaluation:
    """The aggregator's reading of federated evaluations (mixed into fedq.roles.aggregator.Aggregator)."""

    run_id: str
    store: RunStore

    if TYPE_CHECKING:  # the Aggregator's (and Collecting's), used here
        # Renew the lease and honour stop requests between long steps.
        def _tick(self) -> None: ...
        # Raise when the run vanished from Redis.
        def _check_exists(self) -> None: ...
        # Block until the expected clients answered, or the quorum at a deadline.
        def _wait_quorum(self, spec: RunSpec, what: str, have: Callable[[], int], on_idle: Callable[[], None],
                         on_wake: Callable[[str], None], expected: int | None = None,
                         quorum: int | None = None) -> None: ...

    def _with_fed_eval(self, rnd: Round, round_no: int) -> dict[str, Any] | None:
        """The previous round's record with the federated evaluation its global model got from
        the clients of this round (each evaluated the global model it trained from)."""
        if round_no < 2:
            return None
        prev = self.store.last_metrics()
        if prev is None or prev.get("round") != round_no - 1:
            return None
        records = self.store.clients()
        items = []
        for upd in rnd.folded.values():
            if "eval_examples" not in upd.metrics:
                continue
            try:
                items.append(evaluation.check_eval_metrics(upd.metrics, records.get(upd.client_id, {}).get("val_rows")))
            except UpdateRejected as exc:  # the update itself stands; only its evaluation is ignored
                log.warning("run %s round %d: ignoring %s's evaluation: %s", self.run_id, round_no,
                            upd.client_id, exc)
        fed = evaluation.combine(items)
        return {**prev, **fed} if fed else None

    def _final_evaluation(self, spec: RunSpec, round_no: int) -> None:
        """Collect the clients' evaluations of the last global model, then finish the run."""
        selected = self.store.selected(round_no + 1) if spec.sampled else None
        expected = spec.clients if selected is None else len(selected)
        evals = _Evaluations()

        def scan(_cid: str | None = None) -> None:
            self._check_exists()
            self._judge_evaluations(round_no, evals)

        scan()
        try:
            self._wait_quorum(spec, "final evaluation", lambda: len(evals.good) + len(evals.refused), scan, scan,
                              expected=expected, quorum=min(spec.quorum, expected))
        except RoundTimeout as exc:  # the model is trained; a missing evaluation must not fail the run
            log.warning("run %s: %s; finishing with the evaluations that came", self.run_id, exc)
        scan()
        self._finish(round_no, evals)

    def _judge_evaluations(self, round_no: int, evals: _Evaluations) -> None:
        """Judge every stored evaluation not judged yet (each version once)."""
        records = self.store.clients()
        for cid, raw in self.store.evals().items():
            if evals.judged.get(cid) == raw:
                continue
            evals.judged[cid] = raw
            try:
                if cid not in records:
                    raise UpdateRejected(Refusal.UNKNOWN_CLIENT, f"client {cid!r} has not joined run {self.run_id}")
                evals.good[cid] = evaluation.validate_eval(raw, run_id=self.run_id, round_no=round_no, client_id=cid,
                                                           max_examples=records[cid].get("val_rows"))
                evals.refused.discard(cid)
            except UpdateRejected as exc:
                log.warning("run %s: refused evaluation from %s: %s", self.run_id, cid, exc)
                self.store.record_refused(cid, round_no, exc.reason, exc.detail)
                evals.good.pop(cid, None)
                evals.refused.add(cid)

    def _finish(self, round_no: int, evals: _Evaluations) -> None:
        """Finish the run: the last round's record and the final record gain the evaluations' combination."""
        fed = evaluation.combine(evals.good.values())
        last = self.store.last_metrics()
        if last is not None and last.get("round") == round_no:
            last = {**last, **fed}
        else:
            last = None
        final = {**record.final_record(last or {"round": round_no}), **fed}
        self._tick()
        if self.store.finish_evaluation(round_no, last, final):
            log.info("run %s: final federated evaluation from %d clients: accuracy %s", self.run_id,
                     len(evals.good), f"{fed['fed_eval_accuracy']:.4f}" if fed else "-")


@dataclass
class _Evaluations:
    """The final evaluations judged so far."""

    good: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    judged: dict[str, bytes] = field(default_factory=dict)  # client id -> the payload last judged
