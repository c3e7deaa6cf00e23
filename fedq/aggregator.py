"""The aggregator: drives one run's rounds. ``drive_run`` is the rq job that a worker executes."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from fedq import codec, protocol
from fedq.aggregate import FedAvg, weighted_metrics
from fedq.data import FeatureStats, combine_stats, load_dataset, scaler_from_stats, split_indices, standardize
from fedq.errors import CodecError, DataError, FedqError, UpdateRejected
from fedq.models import build_model, evaluate, weight_names
from fedq.settings import Settings
from fedq.spec import RunSpec
from fedq.store import ENDED, RunStore, connect

log = logging.getLogger("fedq.aggregator")


class RoundTimeout(FedqError):
    """Not all expected messages arrived before the round deadline."""


class AggregatorStopped(FedqError):
    """The aggregator was asked to stop; the run stays as it is for another driver to resume."""


@dataclass
class _Round:
    """What one round has folded and refused so far (small: digests and counts, not models)."""

    acc: FedAvg
    joined: set[str]
    folded: dict[str, protocol.Update] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # client id -> digest of the refused payload
    fold_seconds: float = 0.0
    last_arrival: float = 0.0

    @property
    def responded(self) -> int:
        return len(self.folded) + len(self.refused)


class Aggregator:
    """Drives a run from its join phase to its last round; all state lives in Redis."""

    def __init__(self, r: redis.Redis, settings: Settings, run_id: str,
                 stop: threading.Event | None = None) -> None:
        self.r = r
        self.settings = settings
        self.store = RunStore(r, run_id)
        self.run_id = run_id
        self.stop = stop or threading.Event()
        self.driver = f"{socket.gethostname()}:{os.getpid()}"

    def run(self) -> dict[str, Any]:
        """Drive the run to its end; returns the final state. Failures are written to Redis."""
        try:
            return self._run()
        except (DataError, CodecError, RoundTimeout) as exc:
            log.error("run %s failed: %s", self.run_id, exc)
            self.store.fail(str(exc))
            return self.store.state()

    def _run(self) -> dict[str, Any]:
        spec = self.store.spec()
        state = self.store.state()
        if state.get("status") in ENDED:
            log.info("run %s already %s", self.run_id, state["status"])
            return state
        self.store.mark_started(self.driver)
        log.info("driving run %s: %d clients, %d rounds", self.run_id, spec.clients, spec.rounds)

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
            log.info("run %s: %d clients joined; initial global model written", self.run_id, spec.clients)
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
            t_commit = time.perf_counter()
            committed = self.store.commit_round(round_no, payload, metrics, final)
            log.info("run %s round %d/%d: %d updates, %d examples, test accuracy %.4f (commit %.1f ms)%s",
                     self.run_id, round_no, spec.rounds, metrics["num_updates"], metrics["num_examples"],
                     test["accuracy"], (time.perf_counter() - t_commit) * 1000,
                     "" if committed else " [already committed by another driver]")
            round_started = time.time()
            g_tensors = weights
        return self.store.state()

    def _deadline_check(self, deadline: float, timeout_message: str) -> None:
        if self.stop.is_set():
            raise AggregatorStopped(f"aggregator stopped; run {self.run_id} left for another driver")
        if time.monotonic() > deadline:
            raise RoundTimeout(timeout_message)

    def _collect_joins(self, spec: RunSpec, num_features: int) -> tuple[np.ndarray, np.ndarray]:
        """Block until every client has joined with valid statistics; combine them."""
        deadline = time.monotonic() + spec.round_timeout
        while True:
            good: list[FeatureStats] = []
            for cid, raw in self.store.stats().items():
                try:
                    st = FeatureStats.from_dict(raw)
                    if len(st.count) != num_features:
                        raise DataError(f"{len(st.count)} features, the run's data has {num_features}")
                    good.append(st)
                except (DataError, TypeError, KeyError) as exc:
                    self._refuse_join(cid, str(exc))
            if len(good) >= spec.clients:
                combined = combine_stats(good)
                return scaler_from_stats(combined)
            self._deadline_check(deadline, f"only {len(good)} of {spec.clients} clients joined within "
                                           f"{spec.round_timeout:g} s")
            self.store.pop_inbox(self.settings.block_seconds)

    def _refuse_join(self, cid: str, detail: str) -> None:
        log.warning("run %s: refusing client %s: bad statistics: %s", self.run_id, cid, detail)
        self.store.record_refused(cid, 0, "bad_stats", detail)
        self.r.hdel(self.store.k.stats, cid)
        self.r.hdel(self.store.k.clients, cid)

    def _collect_round(self, spec: RunSpec, round_no: int, template: list[protocol.TensorSpec],
                       like: list[np.ndarray]) -> _Round:
        """Block until every joined client has a stored update for the round (valid or refused)."""
        rnd = _Round(acc=FedAvg(like), joined=set(self.store.clients()))
        for cid in self.store.update_ids(round_no):  # a resumed round: fold what is already stored
            self._consider(rnd, round_no, cid, template)
        deadline = time.monotonic() + spec.round_timeout
        while rnd.responded < spec.clients:
            self._deadline_check(deadline, f"round {round_no} timed out after {spec.round_timeout:g} s "
                                           f"with {len(rnd.folded)} of {spec.clients} updates")
            cid = self.store.pop_inbox(self.settings.block_seconds)
            if cid is not None:
                self._consider(rnd, round_no, cid, template)
        if not rnd.folded:
            raise RoundTimeout(f"round {round_no}: every update was refused")
        return rnd

    def _consider(self, rnd: _Round, round_no: int, cid: str, template: list[protocol.TensorSpec]) -> None:
        """Validate and fold one client's stored update, at most once per distinct payload."""
        payload = self.store.get_update(round_no, cid)
        if payload is None:
            return
        t0 = time.perf_counter()
        dig = codec.digest(payload)
        previous = rnd.folded.get(cid)
        if (previous is not None and previous.digest == dig) or rnd.refused.get(cid) == dig:
            return  # a duplicate wake-up for a payload already handled
        try:
            if cid not in rnd.joined:
                raise UpdateRejected("unknown_client", f"client {cid!r} has not joined run {self.run_id}")
            upd = protocol.validate_update(payload, run_id=self.run_id, round_no=round_no,
                                           client_id=cid, template=template)
        except UpdateRejected as exc:
            log.warning("run %s round %d: refused update from %s: %s", self.run_id, round_no, cid, exc)
            self.store.record_refused(cid, round_no, exc.reason, exc.detail)
            if cid in rnd.joined:
                rnd.refused[cid] = dig
            if rnd.folded.pop(cid, None) is not None:
                self._refold(rnd)
            return
        finally:
            rnd.fold_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        rnd.refused.pop(cid, None)
        # Strip the tensors from what we keep: memory stays one model, not N.
        kept = protocol.Update(upd.client_id, upd.round, upd.num_examples, upd.metrics, [], upd.digest)
        if previous is not None:
            rnd.folded[cid] = kept  # a re-push replaces: rebuild the sum without the old payload
            self._refold(rnd)
        else:
            rnd.acc.add(upd.tensors, upd.num_examples)
            rnd.folded[cid] = kept
        rnd.last_arrival = time.time()
        rnd.fold_seconds += time.perf_counter() - t0

    def _refold(self, rnd: _Round) -> None:
        """Recompute the running sum from the stored payloads of the folded clients."""
        rnd.acc.reset()
        for cid, kept in list(rnd.folded.items()):
            payload = self.store.get_update(kept.round, cid)
            env = codec.decode(payload, expect_kind=protocol.KIND_UPDATE)
            rnd.acc.add(env.tensors, kept.num_examples)

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


def drive_run(run_id: str) -> dict[str, Any]:
    """rq job: drive one run with settings from the environment (the worker exports them)."""
    settings = Settings.from_env()
    r = connect(settings)
    try:
        return Aggregator(r, settings, run_id).run()
    except AggregatorStopped:
        raise
    except Exception as exc:
        # Whatever broke, the run must not stay "running" with nobody driving it.
        log.exception("run %s: aggregator crashed", run_id)
        RunStore(r, run_id).fail(f"aggregator crashed: {type(exc).__name__}: {exc}")
        raise
