"""The aggregator: drives one run's rounds (fedq.roles.jobs.drive_run is the rq job that runs it).

``Aggregator`` holds the lease and the loop over rounds; the units it is made of are mixed in:
``Preparing`` (model, strategy, shared state), ``Admission``, ``Collecting`` (waiting for a
round's updates), ``Judging``, ``Committing`` (write, evaluate, record, commit),
``FederatedEvaluation`` and ``Buffering`` (buffered aggregation's versions).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import numpy as np
import redis

from fedq.errors import CodecError, ConfigError, DataError, FedqError, RoundTimeout, SecAggError
from fedq.learning.spec import RunSpec, load_spec
from fedq.protocol import messages, transfer
from fedq.protocol.fencing import LeaseLost
from fedq.protocol.signing import Verifier
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import ENDED, Phase
from fedq.roles.admission import Admission
from fedq.roles.buffered import Buffering
from fedq.roles.collecting import Collecting
from fedq.roles.committing import Committing
from fedq.roles.evaluating import FederatedEvaluation
from fedq.roles.judging import Judging
from fedq.roles.preparing import Driving, Prepared, Preparing
from fedq.settings import Settings

log = logging.getLogger("fedq.roles.aggregator")


class AggregatorStopped(FedqError):
    """The aggregator was asked to stop; the run stays as it is for another driver to resume."""


class RunVanished(FedqError):
    """The run's keys disappeared from Redis (restarted without persistence, or flushed)."""


class Aggregator(Collecting, Committing, Preparing, Admission, FederatedEvaluation, Judging, Buffering):
    """Drives a run from its join phase to its last round; all state lives in Redis.

    Only the holder of the run's lease drives it; every write that moves the run on is
    fenced by that lease, so a paused or partitioned former driver cannot commit."""

    def __init__(self, r: redis.Redis, settings: Settings, run_id: str,
                 stop: threading.Event | None = None, driver: str | None = None) -> None:
        self.r = r
        self.settings = settings
        self.store = RunStore(r, run_id)
        self.run_id = run_id
        self.stop = stop or threading.Event()
        self.driver = driver or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # With a registry of client keys, every update must carry a valid signature.
        self.verifier = Verifier.from_file(settings.client_keys) if settings.client_keys else None
        self._renewed = 0.0
        self._seen_alive: set[str] = set()  # clients whose heartbeat this driver has seen
        self._join_rows: dict[str, int | None] = {}  # member -> rows it joined with, read once (Admission)

    def run(self) -> dict[str, Any]:
        """Drive the run to its end (standing by while another aggregator drives it).

        Returns the final state. Failures are written to Redis; a stop request releases the
        lease (so a standby takes over at once) and raises AggregatorStopped."""
        try:
            spec = load_spec(self.store)
            # The slow part (data, TensorFlow, the model) comes before the lease, so a loaded
            # machine cannot make the lease lapse before the first renewal, and a standby is
            # ready to drive the moment it takes over.
            prepared = self._prepare(spec)
            if not self._acquire():
                return self.store.state()
            return self._run(spec, prepared)
        except (DataError, CodecError, ConfigError, RoundTimeout, SecAggError) as exc:
            log.error("run %s failed: %s", self.run_id, exc)
            self.store.fail(str(exc))
            return self.store.state()
        except RunVanished as exc:
            self._tombstone(exc)
            raise
        except LeaseLost as exc:
            # A Redis restarted without persistence loses the lease along with the run: that
            # is not a hand-over, and nobody else would ever record why the run ended.
            if not self.r.exists(self.store.k.spec):
                vanished = self._vanished()
                self._tombstone(vanished)
                raise vanished from exc
            log.warning("%s; leaving the run to its new driver", exc)
            return self.store.state()
        finally:
            if self.store.driver is not None and self.store.release_lease():
                log.info("run %s: lease released by %s", self.run_id, self.driver)

    def _tombstone(self, exc: RunVanished) -> None:
        """Mark a vanished run failed, so that clients and the dashboard see why it ended."""
        log.error("%s", exc)
        self.store.driver = None
        self.store.fail(str(exc))

    def _acquire(self) -> bool:
        """Take the lease, standing by (blocking on the run's events) while another holds it."""
        last = "$"
        announced = False
        while True:
            state = self.store.state()
            if not state:
                raise RunVanished(f"run {self.run_id} has no state in Redis")
            if state.get("status") in ENDED:
                log.info("run %s already %s", self.run_id, state["status"])
                return False
            if self.store.acquire_lease(self.driver, self.settings.lease_seconds):
                self._renewed = time.monotonic()
                return True
            if not announced:
                log.info("run %s is driven by %s; standing by", self.run_id, self.store.lease_holder())
                announced = True
            self.r.set(self.store.k.standby, self.driver, px=int(self.settings.lease_seconds * 1000))
            if self.stop.is_set():
                raise AggregatorStopped(f"aggregator stopped while standing by for run {self.run_id}")
            last, _ = self.store.wait_event(last, self.settings.block_seconds)

    def _tick(self) -> None:
        """Called between blocking calls: honour stop requests and keep the lease alive."""
        if self.stop.is_set():
            raise AggregatorStopped(f"aggregator stopped; run {self.run_id} left for another driver")
        if time.monotonic() - self._renewed > self.settings.lease_seconds / 3:
            self.store.renew_lease(self.settings.lease_seconds)
            self._renewed = time.monotonic()

    def _vanished(self) -> RunVanished:
        return RunVanished(f"run {self.run_id} vanished from Redis (restarted without persistence, "
                           f"or flushed); it cannot continue")

    def _check_exists(self) -> None:
        if not self.r.exists(self.store.k.spec):
            raise self._vanished()

    def _run(self, spec: RunSpec, prepared: Prepared) -> dict[str, Any]:
        """Open training (after the join phase) or resume, then drive the rounds left."""
        state = self.store.state()
        self.store.mark_started(self.driver)
        log.info("driving run %s (%s at round %s): %d clients (quorum %d), %d rounds", self.run_id,
                 state.get("phase"), state.get("round"), spec.clients, spec.quorum, spec.rounds)
        if state.get("phase") == Phase.JOIN:
            mean, std = self._open_training(spec, prepared)
        else:
            scaler = self.store.scaler_payload()
            if scaler is None:
                raise CodecError(f"run {self.run_id} has no scaler to resume with")
            mean, std, _ = messages.decode_scaler(scaler)
            # Clients counted in a committed round had a heartbeat then: one that died before
            # this driver took over must not hold every round to its deadline.
            self._seen_alive.update(cid for m in self.store.metrics() for cid in (m.get("clients") or {}))
        drive = self._driving(spec, prepared, mean, std)
        if spec.buffered:
            self._drive_versions(drive)  # fedq.roles.buffered: model versions instead of rounds
        while drive.round_no < spec.rounds:
            drive.round_no += 1
            self._drive_round(drive)
        if drive.fed_eval and self.store.state().get("phase") == Phase.EVAL:
            self._final_evaluation(spec, drive.round_no)
        return self.store.state()

    def _open_training(self, spec: RunSpec, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        """The join phase: admit clients, combine their statistics, write the scaler and the
        initial global model, open round 1. Returns the scaler's mean and std."""
        ds, model = prepared.ds, prepared.model
        mean, std = self._collect_joins(spec, ds.num_features)
        scaler = messages.encode_scaler(mean, std, {
            "num_features": ds.num_features, "num_classes": ds.num_classes,
            "class_names": list(ds.class_names), "feature_names": list(ds.feature_names)})
        if model is None:
            initial = self._initial_global(spec, ds.num_features, ds.num_classes)
        else:
            initial, _ = transfer.encode_global(self.store, 0, prepared.names, model.get_weights(),
                                                self.settings.chunk_bytes)
        self.store.open_training(scaler, initial, self._select(spec, 1))
        self.store.drop_initial()  # committed: round 0's model is the global model now
        log.info("run %s: training open; initial global model written", self.run_id)
        return mean, std

    def _drive_round(self, drive: Driving) -> None:
        """One round, as stages: collect (judge and fold) -> write the next global model ->
        evaluate it -> record -> commit."""
        spec, round_no, strategy = drive.spec, drive.round_no, drive.strategy
        strategy.begin_round(drive.global_tensors, noise_rng=self._noise_rng(spec, round_no))
        rnd = self._collect_round(spec, round_no, drive.wire, strategy, drive.global_tensors or [], drive.members)
        weights, payload, parts = self._write_global(drive)
        test, eval_seconds = self._evaluate(drive, weights)
        metrics = self._record(drive, rnd, test, eval_seconds)
        drive.members = self._commit(drive, rnd, payload, parts, metrics)
        log.info("run %s round %d/%d: %d updates, %d examples, test accuracy %s", self.run_id, round_no,
                 spec.rounds, metrics["num_updates"], metrics["num_examples"],
                 "-" if "accuracy" not in test else f"{test['accuracy']:.4f}")
        drive.round_started = time.time()
        drive.global_tensors = weights
