"""Finishing a round: write the next global model, evaluate it centrally, record the round and
commit it in one fenced step (``Committing``, mixed into fedq.roles.aggregator.Aggregator)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from fedq.learning.models import evaluate, keras_file
from fedq.learning.spec import RunSpec
from fedq.protocol import chunking, transfer
from fedq.protocol.fencing import Commit
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Phase
from fedq.roles import metrics as fedq_metrics
from fedq.roles import record, secure
from fedq.roles.judging import Round
from fedq.roles.preparing import Driving
from fedq.settings import Settings

log = logging.getLogger("fedq.roles.aggregator")


class Committing:
    """The aggregator's end of a round (mixed into Aggregator)."""

    run_id: str
    settings: Settings
    store: RunStore

    if TYPE_CHECKING:
        def _tick(self) -> None: ...
        def _select(self, spec: RunSpec, round_no: int) -> list[str] | None: ...
        def _with_fed_eval(self, rnd: Round, round_no: int) -> dict[str, Any] | None: ...

    def _write_global(self, drive: Driving) -> tuple[list[np.ndarray] | None, bytes, int]:
        """The next global model written to Redis (its parts first, when it has any): returns the
        weights (None when streamed slice by slice from the sum), the payload to commit and the
        number of parts."""
        if drive.stream:
            payload, written = transfer.encode_global_from(self.store, drive.round_no, drive.template,
                                                           drive.strategy.result_slice, self.settings.chunk_bytes,
                                                           on_part=self._tick)
            return None, payload, len(written)
        weights = drive.strategy.result()
        payload, written = transfer.encode_global(self.store, drive.round_no, [t.name for t in drive.template],
                                                  weights, self.settings.chunk_bytes, on_part=self._tick)
        return weights, payload, len(written)

    def _evaluate(self, drive: Driving, weights: list[np.ndarray] | None) -> tuple[dict[str, Any], float]:
        """Central evaluation of the new global model on the held-out test split ({} without it)."""
        t0 = time.perf_counter()
        if drive.model is None or weights is None:
            return {}, 0.0
        drive.model.set_weights(weights)
        return evaluate(drive.model, drive.x_test, drive.y_test, drive.num_classes), time.perf_counter() - t0

    def _record(self, drive: Driving, rnd: Round, test: dict[str, Any], eval_seconds: float) -> dict[str, Any]:
        """The round's record (fedq:{run}:metrics, report.json's rounds)."""
        metrics = record.round_metrics(rnd, drive.round_no, test, drive.round_started, eval_seconds)
        metrics["compression"] = record.compression_summary(rnd, drive.template)
        metrics.update(record.central_extras(test))
        metrics.update(drive.spec.privacy_metrics(drive.round_no))  # epsilon spent so far (DP runs)
        if drive.strategy.round_info():
            metrics["strategy"] = drive.strategy.round_info()
        if rnd.selected is not None:
            metrics["selected"] = sorted(rnd.selected)
        return metrics

    def _commit(self, drive: Driving, rnd: Round, payload: bytes, parts: int,
                metrics: dict[str, Any]) -> list[str] | None:
        """Commit the round: the global model, counter, record, server state and the next
        round's chosen clients in one fenced step. Returns the members its close saw when this
        commit opened the next round (None when the round was committed already: the next
        round looks for itself)."""
        spec, round_no = drive.spec, drive.round_no
        # A global model's parts live two rounds, so a client still reading the previous one is
        # not cut short; those of two rounds back go with this commit.
        stale = [self.store.k.global_part(round_no - 2, k) for k in range(parts)] if round_no >= 2 else []
        stale += secure.round_keys(drive.strategy, round_no)  # its masked-sum messages
        last = round_no == spec.rounds
        after = Phase.TRAIN if not last else Phase.EVAL if drive.fed_eval else Phase.DONE
        model_file = self._model_file(drive) if last else None
        self._tick()
        committed = self.store.commit_round(Commit(
            round=round_no, global_payload=payload, metrics=metrics, after=after,
            final=record.final_record(metrics) if after == Phase.DONE else None, keep_updates=spec.keep_updates,
            server_state=drive.strategy.state_bytes(round_no),
            next_selected=self._select(spec, round_no + 1) if after != Phase.DONE else None,
            previous_metrics=self._with_fed_eval(rnd, round_no) if drive.fed_eval else None,
            update_parts=sorted(rnd.part_keys), stale_parts=stale, model_file=model_file,
            members=rnd.members))
        if committed:
            fedq_metrics.observe_round(metrics["seconds"])
            return rnd.members
        log.info("run %s round %d was committed already", self.run_id, round_no)
        return None

    def _model_file(self, drive: Driving) -> bytes | None:
        """The final global model as a .keras file, committed with the last round for the
        dashboard's model.keras; None without a Keras model here (a lean aggregator never loads
        TensorFlow), over FEDQ_MAX_MODEL_FILE_BYTES, or when Keras cannot save the model."""
        limit = self.settings.max_model_file_bytes
        if drive.model is None or limit <= 0:
            return None
        weights = chunking.model_bytes(drive.template)
        if weights > limit:  # the file holds the weights at least: spare the serialisation
            log.warning("run %s: no model.keras in Redis: %d bytes of weights exceed FEDQ_MAX_MODEL_FILE_BYTES=%d",
                        self.run_id, weights, limit)
            return None
        try:
            data = keras_file(drive.model, drive.spec.optimizer, drive.spec.learning_rate)
        except Exception as exc:  # a model of the user's own Keras cannot save must not fail the run
            log.warning("run %s: no model.keras in Redis: saving the model failed: %s: %s", self.run_id,
                        type(exc).__name__, exc)
            return None
        if len(data) > limit:
            log.warning("run %s: no model.keras in Redis: the file's %d bytes exceed FEDQ_MAX_MODEL_FILE_BYTES=%d",
                        self.run_id, len(data), limit)
            return None
        return data
