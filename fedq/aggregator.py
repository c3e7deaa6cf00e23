"""The aggregator: drives one run's rounds. ``drive_run`` is the rq job that a worker executes."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import redis

from fedq import codec, heartbeat, protocol
from fedq import metrics as fedq_metrics
from fedq.aggregate import FedAvg, weighted_metrics
from fedq.data import FeatureStats, combine_stats, load_dataset, scaler_from_stats, split_indices, standardize
from fedq.errors import CodecError, DataError, FedqError, UpdateRejected
from fedq.models import build_model, evaluate, weight_names
from fedq.settings import Settings
from fedq.spec import RunSpec
from fedq.store import ENDED, LeaseLost, RunStore, connect

log = logging.getLogger("fedq.aggregator")


class RoundTimeout(FedqError):
    """Not all expected messages arrived before the round deadline."""


class AggregatorStopped(FedqError):
    """The aggregator was asked to stop; the run stays as it is for another driver to resume."""


class RunVanished(FedqError):
    """The run's keys disappeared from Redis (restarted without persistence, or flushed)."""


@dataclass
class _Round:
    """What one round has folded and refused so far (small: digests and counts, not models)."""

    acc: FedAvg
    joined: dict[str, int | None]  # client id -> rows it joined with (None: not reported)
    folded: dict[str, protocol.Update] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    # client id -> version of its update last judged (push sequence number; a digest for a
    # payload written around the protocol), so each version is judged exactly once.
    versions: dict[str, int | str] = field(default_factory=dict)
    fold_seconds: float = 0.0
    last_arrival: float = 0.0

    @property
    def responded(self) -> int:
        return len(self.folded) + len(self.refused)


class Aggregator:
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
        self._renewed = 0.0

    def run(self) -> dict[str, Any]:
        """Drive the run to its end (standing by while another aggregator drives it).

        Returns the final state. Failures are written to Redis; a stop request releases the
        lease (so a standby takes over at once) and raises AggregatorStopped."""
        try:
            if not self._acquire():
                return self.store.state()
            return self._run()
        except (DataError, CodecError, RoundTimeout) as exc:
            log.error("run %s failed: %s", self.run_id, exc)
            self.store.fail(str(exc))
            return self.store.state()
        except RunVanished as exc:
            log.error("%s", exc)
            self.store.driver = None
            self.store.fail(str(exc))  # a tombstone, so that clients and the dashboard see why
            raise
        except LeaseLost as exc:
            log.warning("%s; leaving the run to its new driver", exc)
            return self.store.state()
        finally:
            if self.store.driver is not None and self.store.release_lease():
                log.info("run %s: lease released by %s", self.run_id, self.driver)

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

    def _check_exists(self) -> None:
        if not self.r.exists(self.store.k.spec):
            raise RunVanished(f"run {self.run_id} vanished from Redis (restarted without persistence, "
                              f"or flushed); it cannot continue")

    def _run(self) -> dict[str, Any]:
        spec = self.store.spec()
        state = self.store.state()
        self.store.mark_started(self.driver)
        log.info("driving run %s (%s at round %s): %d clients (quorum %d), %d rounds", self.run_id,
                 state.get("phase"), state.get("round"), spec.clients, spec.quorum, spec.rounds)

        ds = load_dataset(spec.data)
        _, test_idx = split_indices(ds.y, spec.data.test_fraction, spec.data.seed)
        model = build_model(spec.model, ds.num_features, ds.num_classes, spec.seed)
        names = weight_names(model)
        if state.get("phase") == "join":
            mean, std = self._collect_joins(spec, ds.num_features)
            scaler = protocol.encode_scaler(mean, std, {
                "num_features": ds.num_features, "num_classes": ds.num_classes,
                "class_names": list(ds.class_names), "feature_names": list(ds.feature_names)})
            initial = protocol.encode_global(self.run_id, 0, names, model.get_weights())
            self.store.open_training(scaler, initial)
            log.info("run %s: training open; initial global model written", self.run_id)
        else:
            mean, std, _ = protocol.decode_scaler(self.store.scaler_payload())
        x_test = standardize(ds.x[test_idx], mean, std)
        y_test = ds.y[test_idx]

        round_no, g_names, g_tensors = protocol.decode_global(self.store.global_payload(), self.run_id)
        template = protocol.template_of(g_names, g_tensors)
        round_started = time.time()
        while round_no < spec.rounds:
            round_no += 1
            rnd = self._collect_round(spec, round_no, template, g_tensors)
            weights = rnd.acc.result()
            t_eval = time.perf_counter()
            model.set_weights(weights)
            test = evaluate(model, x_test, y_test)
            eval_seconds = time.perf_counter() - t_eval
            metrics = self._round_metrics(rnd, round_no, test, round_started, eval_seconds)
            payload = protocol.encode_global(self.run_id, round_no, g_names, weights)
            final = None
            if round_no == spec.rounds:
                final = {"test_loss": test["loss"], "test_accuracy": test["accuracy"], "round": round_no}
            self._tick()
            t_commit = time.perf_counter()
            committed = self.store.commit_round(round_no, payload, metrics, final, keep_updates=spec.keep_updates)
            if committed:
                fedq_metrics.observe_round(metrics["seconds"])
            log.info("run %s round %d/%d: %d updates, %d examples, test accuracy %.4f (commit %.1f ms)%s",
                     self.run_id, round_no, spec.rounds, metrics["num_updates"], metrics["num_examples"],
                     test["accuracy"], (time.perf_counter() - t_commit) * 1000,
                     "" if committed else " [already committed]")
            round_started = time.time()
            g_tensors = weights
        return self.store.state()

    def _wait_quorum(self, spec: RunSpec, what: str, have: Callable[[], int], on_idle: Callable[[], None],
                     on_wake: Callable[[str], None]) -> None:
        """Block until all clients answered, or a deadline passes with at least the quorum.

        Below the quorum at a deadline, wait again (spec.round_retries times), then fail."""
        deadline = time.monotonic() + spec.round_timeout
        retries = spec.round_retries
        while have() < spec.clients:
            self._tick()
            if time.monotonic() > deadline:
                got = have()
                if got >= spec.quorum:
                    log.warning("run %s: %s: deadline passed with %d of %d; closing with the quorum (%d)",
                                self.run_id, what, got, spec.clients, spec.quorum)
                    return
                if retries == 0:
                    raise RoundTimeout(f"{what}: only {got} of {spec.clients} (quorum {spec.quorum}) after "
                                       f"{spec.round_timeout:g} s and {spec.round_retries} more waits")
                retries -= 1
                deadline = time.monotonic() + spec.round_timeout
                log.warning("run %s: %s: %d of %d, below the quorum of %d; waiting again (%d waits left)",
                            self.run_id, what, got, spec.clients, spec.quorum, retries)
            cid = self.store.pop_inbox(self.settings.block_seconds)
            if cid is None:
                on_idle()
            else:
                on_wake(cid)

    def _collect_joins(self, spec: RunSpec, num_features: int) -> tuple[np.ndarray, np.ndarray]:
        """Block until the clients joined with valid statistics (or the quorum at the deadline)."""
        good: dict[str, FeatureStats] = {}

        def scan(_cid: str | None = None) -> None:
            self._check_exists()
            for cid, raw in self.store.stats().items():
                if cid in good:
                    continue
                try:
                    st = FeatureStats.from_dict(raw)
                    if len(st.count) != num_features:
                        raise DataError(f"{len(st.count)} features, the run's data has {num_features}")
                    good[cid] = st
                except (DataError, TypeError, KeyError) as exc:
                    self._refuse_join(cid, str(exc))

        scan()
        self._wait_quorum(spec, "joining", lambda: len(good), scan, scan)
        return scaler_from_stats(combine_stats(list(good.values())))

    def _refuse_join(self, cid: str, detail: str) -> None:
        log.warning("run %s: refusing client %s: bad statistics: %s", self.run_id, cid, detail)
        self.store.record_refused(cid, 0, "bad_stats", detail)
        self.r.hdel(self.store.k.stats, cid)
        self.r.hdel(self.store.k.clients, cid)

    def _collect_round(self, spec: RunSpec, round_no: int, template: list[protocol.TensorSpec],
                       like: list[np.ndarray]) -> _Round:
        """Block until every joined client has a stored update for the round (valid or refused),
        or the deadline passes with the quorum."""
        rnd = _Round(acc=FedAvg(like), joined=self._joined())

        def rescan() -> None:
            # Wake-ups are hints; the sequence numbers are the truth. An idle moment re-reads
            # them, so a wake-up lost to a dropped connection costs a second, not the round.
            self._check_exists()
            rnd.joined = self._joined()  # late joiners count from now on
            fedq_metrics.set_clients_alive(heartbeat.count_alive_clients(self.r, self.run_id, sorted(rnd.joined)))
            for cid, seq in self.store.update_seqs(round_no).items():
                if rnd.versions.get(cid) != seq:
                    self._consider(rnd, round_no, cid, template)

        rescan()  # a resumed round: fold what is already stored
        self._wait_quorum(spec, f"round {round_no}", lambda: rnd.responded, rescan,
                          lambda cid: self._consider(rnd, round_no, cid, template))
        # Close the round, then take in whatever was stored before the close: after this no
        # push can change it, so what we commit is exactly what was accepted.
        self.store.close_round(round_no)
        rescan()
        if not rnd.folded:
            raise RoundTimeout(f"round {round_no}: every update was refused")
        return rnd

    def _joined(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for cid, rec in self.store.clients().items():
            rows = rec.get("rows")
            out[cid] = rows if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0 else None
        return out

    def _judge(self, rnd: _Round, round_no: int, cid: str, template: list[protocol.TensorSpec],
               observe: bool = True) -> protocol.Update | None:
        """Read and validate a client's current update; records and returns None on refusal."""
        payload, seq = self.store.get_update(round_no, cid)
        if payload is None:
            return None
        version: int | str = seq or "d:" + codec.digest(payload)
        if rnd.versions.get(cid) == version:
            return None  # a duplicate wake-up for a version already judged
        rnd.versions[cid] = version
        try:
            if cid not in rnd.joined:
                raise UpdateRejected("unknown_client", f"client {cid!r} has not joined run {self.run_id}")
            upd = protocol.validate_update(payload, run_id=self.run_id, round_no=round_no,
                                            client_id=cid, template=template, max_examples=rnd.joined[cid])
        except UpdateRejected as exc:
            if observe:
                fedq_metrics.observe_update(False, exc.reason, len(payload))
            log.warning("run %s round %d: refused update from %s: %s", self.run_id, round_no, cid, exc)
            self.store.record_refused(cid, round_no, exc.reason, exc.detail)
            if cid in rnd.joined:
                rnd.refused.add(cid)
            if rnd.folded.pop(cid, None) is not None:
                self._refold(rnd, round_no, template)  # its earlier, valid version no longer counts
            return None
        if observe:
            fedq_metrics.observe_update(True, None, len(payload))
        return upd

    def _consider(self, rnd: _Round, round_no: int, cid: str, template: list[protocol.TensorSpec]) -> None:
        """Validate and fold one client's stored update, once per version."""
        t0 = time.perf_counter()
        upd = self._judge(rnd, round_no, cid, template)
        if upd is not None:
            rnd.refused.discard(cid)
            replaced = cid in rnd.folded
            rnd.folded[cid] = _strip(upd)  # keep metadata only: memory stays one model, not N
            if replaced:
                self._refold(rnd, round_no, template)  # a re-push replaces: rebuild without the old one
            else:
                rnd.acc.add(upd.tensors, upd.num_examples)
            rnd.last_arrival = time.time()
        rnd.fold_seconds += time.perf_counter() - t0

    def _refold(self, rnd: _Round, round_no: int, template: list[protocol.TensorSpec]) -> None:
        """Recompute the running sum from the current stored updates of the folded clients."""
        rnd.acc.reset()
        for cid in list(rnd.folded):
            # Out of folded and versions first: judge the current version afresh, and a refusal
            # here must not start another rebuild.
            del rnd.folded[cid]
            rnd.versions.pop(cid, None)
            upd = self._judge(rnd, round_no, cid, template, observe=False)  # counted when it arrived
            if upd is not None:
                rnd.acc.add(upd.tensors, upd.num_examples)
                rnd.folded[cid] = _strip(upd)

    def _round_metrics(self, rnd: _Round, round_no: int, test: dict[str, float],
                       round_started: float, eval_seconds: float) -> dict[str, Any]:
        updates = sorted(rnd.folded.values(), key=lambda u: u.client_id)
        train = weighted_metrics((u.metrics, u.num_examples) for u in updates)
        last = max(updates, key=lambda u: u.metrics.get("push_time", 0.0))
        seconds = time.time() - round_started
        return {
            "round": round_no,
            "num_updates": len(updates),
            "num_examples": rnd.acc.total_examples,
            "train_loss": train.get("loss"),
            "train_accuracy": train.get("accuracy"),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "seconds": seconds,
            # Wall time of the round that was neither the last-arriving client's training nor its
            # one-off model set-up (first round only): the cost of the round machinery itself.
            "overhead_seconds": seconds - last.metrics.get("train_seconds", 0.0)
            - last.metrics.get("setup_seconds", 0.0),
            "fold_seconds": rnd.fold_seconds,
            "eval_seconds": eval_seconds,
            "refused": len(rnd.refused),
            "clients": {u.client_id: {"num_examples": u.num_examples, "digest": u.digest, **u.metrics}
                        for u in updates},
        }


def _strip(upd: protocol.Update) -> protocol.Update:
    return protocol.Update(upd.client_id, upd.round, upd.num_examples, upd.metrics, [], upd.digest)


# Set by SIGTERM in an rq work horse (see fedq.jobs.FedqWorker); the driving loop checks it.
HORSE_STOP = threading.Event()


def drive_run(run_id: str) -> dict[str, Any]:
    """rq job: drive one run with settings from the environment (the worker exports them)."""
    settings = Settings.from_env()
    r = connect(settings)
    try:
        return Aggregator(r, settings, run_id, stop=HORSE_STOP).run()
    except AggregatorStopped as exc:
        # Graceful stop: the lease is released; hand the run to whichever worker is free.
        log.info("%s", exc)
        from fedq.jobs import enqueue_resume

        enqueue_resume(r, settings, run_id)
        return {"stopped": True, "run": run_id}
    except RunVanished:
        raise
    except Exception as exc:
        # Whatever broke, the run must not stay "running" with nobody driving it.
        log.exception("run %s: aggregator crashed", run_id)
        RunStore(r, run_id).fail(f"aggregator crashed: {type(exc).__name__}: {exc}")
        raise
