"""The client: owns its data shard, trains locally, pushes updates, follows rounds."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import redis

from fedq.errors import CodecError, ConfigError, DataError, FedqError, RunFailed, RunNotFound
from fedq.learning import evaluation, privacy
from fedq.learning.data import load_test
from fedq.learning.dataspec import DataSpec
from fedq.learning.partition import ClientData, load_client_data
from fedq.learning.scaling import feature_stats, standardize
from fedq.learning.spec import RunSpec, load_spec
from fedq.learning.trainer import Evaluates, KerasTrainer, Trainer
from fedq.protocol import heartbeat, messages, transfer
from fedq.protocol import store as store_mod
from fedq.protocol.compress import CompressionError
from fedq.protocol.signing import Signer
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Event, Phase, Push, Status
from fedq.roles.secure_client import PlainStages, RoundStages, SecureStages
from fedq.settings import Settings

STALE_GLOBAL = "stale_global"  # our own outcome: the global model moved on while we read it
LEFT_OUT = "left_out"  # our own outcome: secure aggregation's round goes on without us
# Push outcomes after which the client looks at the run again (a newer model, or the run's end).
RETRYABLE = (Push.ROUND_CLOSED, Push.ROUND_NOT_OPEN, STALE_GLOBAL, Push.RUN_NOT_TRAINING, Push.STALE,
             Push.ALREADY_FOLDED)

log = logging.getLogger("fedq.roles.client")


class Stopped(FedqError):
    """The process was asked to stop (SIGTERM / Ctrl-C)."""


class JoinRefused(FedqError):
    """The run would not take this client (full, or ended); ``outcome`` is the refusal code."""

    def __init__(self, message: str, outcome: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class Client:
    """One data holder; ``serve`` follows runs until stopped (or one run with once=True)."""

    secure_stages = SecureStages  # the stages of a round with --secure-aggregation

    def __init__(self, r: redis.Redis, settings: Settings, shard: int, *, num_shards: int | None = None,
                 run_id: str | None = None, client_id: str | None = None, data: DataSpec | None = None,
                 stop: threading.Event | None = None,
                 trainer_factory: Callable[..., Trainer] | None = None,
                 global_reader: Callable[[RunStore], tuple[int, list[str], list[np.ndarray]]] | None = None,
                 delay: float = 0.0,
                 waiting: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                 event_waiter: Callable[[RunStore, str, float], tuple[str, list[dict[str, str]]]] | None = None,
                 ) -> None:
        if shard < 0:
            raise ConfigError(f"--shard must be 0 or more, got {shard}")
        if num_shards is not None and not 0 <= shard < num_shards:
            raise ConfigError(f"--shard {shard} is out of range for --num-shards {num_shards} (0..{num_shards - 1})")
        self.r = r
        self.settings = settings
        self.shard = shard
        self.num_shards = num_shards
        self.run_id = run_id
        self.client_id = client_id or f"client-{shard}"
        self.data = data
        self.stop = stop or threading.Event()
        self.done: set[str] = set()
        self.trainer_factory = trainer_factory or functools.partial(KerasTrainer, threads=settings.tf_threads)
        # How the global model is fetched (simulated clients of one process share one fetch).
        self.read_global = global_reader or transfer.read_global
        self._beat: heartbeat.Heartbeat | None = None
        self.signer = Signer.from_file(settings.signing_key) if settings.signing_key else None
        self._dp_rng = np.random.default_rng()  # local DP noise (fresh OS entropy)
        if delay < 0:
            raise ConfigError(f"--delay must be 0 or more, got {delay}")
        self.delay = delay  # seconds added to each local training: a straggler, for experiments
        self._prefetched: bytes | None = None  # the global model read along with the state
        # Entered around every wait for the run (events, admission, a straggler's delay):
        # simulated clients sharing a process give up their turn to run there (fedq.roles.swarm).
        self.waiting = waiting
        # How it blocks on the run's events (simulated clients of one process share one reader).
        self.wait_event = event_waiter or RunStore.wait_event

    # --- finding a run ------------------------------------------------------------------
    def serve(self, once: bool = False) -> list[dict[str, Any]]:
        """Join runs one after another; returns each run's result (one with once=True)."""
        results = []
        while not self.stop.is_set():
            run_id = self._find_run(bounded=once)
            try:
                results.append(self.run_one(run_id))
            except JoinRefused as exc:
                if self.run_id is None:
                    log.info("%s; looking for another run", exc)  # lost a race for the last place
                elif exc.outcome == "run_finished":
                    # A client Job re-created after its run ended has nothing left to do.
                    log.info("run %s has already finished; nothing to do", run_id)
                    results.append(RunStore(self.r, run_id).state())
                else:
                    raise
            self.done.add(run_id)
            if once or self.run_id is not None:
                break
        return results

    def _find_run(self, bounded: bool) -> str:
        """The named run, or the newest open one; blocks on the event stream until there is one."""
        deadline = time.monotonic() + self.settings.wait_seconds
        last = store_mod.last_global_event_id(self.r)
        announced = False
        while True:
            if self.run_id is not None:
                if RunStore(self.r, self.run_id).exists():
                    return self.run_id
            else:
                found = store_mod.newest_open_run(self.r, self.client_id, skip=self.done)
                if found is not None:
                    return found
            if not announced:
                log.info("%s: waiting for %s", self.client_id,
                         f"run {self.run_id}" if self.run_id else "an open run")
                announced = True
            self._check_stop()
            if bounded and time.monotonic() > deadline:
                what = f"run {self.run_id}" if self.run_id else "an open run"
                raise RunNotFound(f"no {what} appeared within {self.settings.wait_seconds:g} s")
            with self.waiting():
                last = store_mod.wait_global_event(self.r, last, self.settings.block_seconds)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped(f"{self.client_id}: stopped")

    # --- one run ----------------------------------------------------------------------------
    def run_one(self, run_id: str) -> dict[str, Any]:
        """Join run_id, train every round, and return the run's final state."""
        st = RunStore(self.r, run_id)
        spec = load_spec(st)
        if self.data is None and self.num_shards is not None and self.num_shards != spec.clients:
            # Shards of the run's own data are dealt per client: another count overlaps or skips rows.
            raise ConfigError(f"--num-shards {self.num_shards} does not match run {run_id}, which deals its data "
                              f"into {spec.clients} shards (one per client): leave --num-shards out")
        num_shards = self.num_shards or spec.clients
        if not 0 <= self.shard < num_shards:
            raise ConfigError(f"shard {self.shard} is out of range for {num_shards} shards (0..{num_shards - 1})")
        data = spec.data
        if self.data is not None:  # the site's own rows, dealt and held out as the run says
            data = dataclasses.replace(self.data, partition=spec.data.partition, alpha=spec.data.alpha,
                                       val_fraction=spec.data.val_fraction)
        part = load_client_data(data, self.shard, num_shards)
        if self.data is not None:
            part = _with_own_test_rows(part, data)
        x, y = part.x, part.y
        self._val_raw = (part.x_val, part.y_val)  # held-out rows for federated evaluation
        # rows: the training rows (they cap the update's sample count); labels: the shard's histogram.
        record = {"shard": self.shard, "num_shards": num_shards, "own_data": self.data is not None, "rows": int(len(y)),
                  "val_rows": int(len(part.y_val)), "labels": part.label_counts(), "partition": data.partition,
                  "host": socket.gethostname(), "pid": os.getpid(), "joined_at": time.time(),
                  "devices": self._devices()}
        outcome = st.join(self.client_id, record, feature_stats(x).to_dict())
        # The aggregator admits clients: a request waits for its answer (or the run's end).
        deadline = time.monotonic() + self.settings.wait_seconds
        while outcome in ("requested", "join_timeout"):
            self._check_stop()
            if time.monotonic() > deadline:
                break
            with self.waiting():
                outcome = st.wait_admitted(self.client_id, timeout=5 * self.settings.block_seconds,
                                           block_seconds=self.settings.block_seconds)
        if outcome not in ("joined", "rejoined"):
            why = outcome if ":" in outcome else outcome.replace("_", " ")  # a verdict carries its detail
            raise JoinRefused(f"{self.client_id} could not join run {run_id}: {why}", outcome.split(":", 1)[0])
        log.info("%s %s run %s with %d rows (shard %d of %d)", self.client_id, outcome, run_id,
                 len(y), self.shard, num_shards)
        self._beat = heartbeat.client_heartbeat(self.r, run_id, self.client_id, ttl=self.settings.heartbeat_seconds,
                                                shard=self.shard).start()
        try:
            return self._train_rounds(st, spec, x, y)
        finally:
            self._beat.stop()
            self._beat = None

    def _devices(self) -> list[str]:
        """What this client trains on (its trainer's devices(), when it tells), logged once."""
        factory = self.trainer_factory
        tell = getattr(getattr(factory, "func", factory), "devices", None)
        devices: list[str] = tell() if callable(tell) else []
        if devices and not getattr(self, "_devices_logged", False):
            self._devices_logged = True
            log.info("%s trains on %s", self.client_id, ", ".join(devices))
        return devices

    def _train_rounds(self, st: RunStore, spec: RunSpec, x_raw: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        # Wake-ups from now on: the state read below covers what came before (with 1,000
        # clients, paging through their 1,000 admissions 100 at a time cost each one seconds).
        last_event = st.last_event_id()
        trainer: Trainer | None = None
        pushed = 0
        evaluated = False
        progress_deadline = time.monotonic() + self.settings.wait_seconds
        expect_global = True  # a round is (about to be) open: read its global model with the state
        while True:
            self._check_stop()
            state = self._read_state(st, expect_global)
            expect_global = False
            if not state:
                raise RunFailed(_vanished(st.run_id))
            status = state.get("status")
            if status == Status.FINISHED:
                log.info("%s: run %s finished", self.client_id, st.run_id)
                return state
            if status == Status.FAILED:
                raise RunFailed(f"run {st.run_id} failed: {state.get('reason', 'no reason recorded')}")
            committed = int(state.get("round", 0))
            if state.get("phase") == Phase.TRAIN and committed + 1 > pushed and spec.sampled \
                    and not st.is_selected(committed + 1, self.client_id):
                log.info("%s: not chosen to train in round %d; waiting for the next", self.client_id, committed + 1)
                pushed = committed + 1  # this round is done for us
                continue
            if state.get("phase") == Phase.EVAL and not evaluated:
                evaluated = True  # one evaluation of the last global model; then wait for the end
                trainer = trainer or self._prepare(st, spec, x_raw, y)
                self._final_eval(st, spec, trainer, committed)
                continue
            if state.get("phase") == Phase.TRAIN and committed + 1 > pushed:
                setup = 0.0
                if trainer is None:
                    t0 = time.perf_counter()
                    trainer = self._prepare(st, spec, x_raw, y)
                    setup = time.perf_counter() - t0
                result = self._do_round(st, spec, trainer, committed + 1, setup)
                if result in (Push.OK, LEFT_OUT):
                    pushed = committed + 1
                elif result == Push.NO_SUCH_RUN:
                    raise RunFailed(_vanished(st.run_id))
                elif result not in RETRYABLE:
                    # Retryable outcomes loop back to re-read the state (which may say the run ended).
                    raise FedqError(f"{self.client_id}: update for round {committed + 1} refused: {result}")
                progress_deadline = time.monotonic() + self.settings.wait_seconds
                if result != Push.OK:
                    continue
                # Pushed: what comes next is the run's next event (a commit, its end), and the
                # state read before the push has nothing newer to tell: wait, without a look.
            if time.monotonic() > progress_deadline:
                raise FedqError(f"run {st.run_id} made no progress for {self.settings.wait_seconds:g} s")
            last_event, events = self._wait_past_admissions(st, last_event)
            if events:
                progress_deadline = time.monotonic() + self.settings.wait_seconds
                # A commit woke us: the next look at the state brings the new model along.
                expect_global = any(e.get("event") in (Event.ROUND, Event.TRAINING) for e in events)

    def _wait_past_admissions(self, st: RunStore, last: str) -> tuple[str, list[dict[str, str]]]:
        """The run's next events, waiting on past other clients' admissions (for up to
        block_seconds in all): with hundreds joining, each admission woke every member for a
        state read that could tell it nothing."""
        deadline = time.monotonic() + self.settings.block_seconds
        while True:
            with self.waiting():
                last, events = self.wait_event(st, last, max(0.001, deadline - time.monotonic()))
            if not events or any(e.get("event") != Event.ADMITTED for e in events) or time.monotonic() >= deadline:
                return last, events

    def _read_state(self, st: RunStore, with_global: bool) -> dict[str, str]:
        """The run's state; with_global, the global model's payload too, in the same round trip
        (kept for _fetch), when this client fetches the model itself."""
        if not with_global or self.read_global is not transfer.read_global:
            self._prefetched = None  # only ever the payload of the latest look
            return st.state()
        state, self._prefetched = st.state_and_global()
        return state

    def _prepare(self, st: RunStore, spec: RunSpec, x_raw: np.ndarray, y: np.ndarray) -> Trainer:
        """Standardise the shard with the run's combined statistics and build the trainer."""
        scaler = st.scaler_payload()
        if scaler is None:
            raise CodecError(f"run {st.run_id} has published no scaler")
        mean, std, meta = messages.decode_scaler(scaler)
        if x_raw.shape[1] != meta["num_features"]:
            raise DataError(f"this client's data has {x_raw.shape[1]} features, "
                            f"the run's has {meta['num_features']}")
        x = standardize(x_raw, mean, std)
        x_val, y_val = getattr(self, "_val_raw", (x_raw[:0], y[:0]))
        self._val = (standardize(x_val, mean, std), y_val)
        return self.trainer_factory(spec, int(meta["num_features"]), int(meta["num_classes"]), x, y,
                                    self.shard, self.stop)

    def _stages(self, st: RunStore, spec: RunSpec, round_no: int) -> RoundStages:
        """The round's stages around training: secure aggregation's, or the plain ones."""
        if spec.secure_aggregation:
            return self.secure_stages(self.r, st, spec, self.client_id, round_no, self.settings.block_seconds)
        return PlainStages(functools.partial(self._encode, spec, round_no))

    def _do_round(self, st: RunStore, spec: RunSpec, trainer: Trainer, round_no: int, setup_seconds: float) -> str:
        """One round, as stages: fetch the global model -> before training (secure aggregation's
        keys and shares) -> train -> privatise (local DP) -> outgoing (compression, or masking) ->
        sign and push (transfer.push_update) -> after the push (reveal). Returns the push outcome."""
        t0 = time.perf_counter()
        base = self._fetch(st, trainer, round_no)
        if base is None:
            return STALE_GLOBAL  # the commit moved on while we read; look again
        fetch_seconds = time.perf_counter() - t0
        stages = self._stages(st, spec, round_no)
        if not stages.before_train():
            return LEFT_OUT
        # Federated evaluation of the global model this round starts from (the last round's model).
        evaluated = self._evaluate(trainer) if round_no >= 2 else {}
        t1 = time.perf_counter()
        metrics = trainer.train(round_no)
        if self.delay:
            with self.waiting():
                self.stop.wait(self.delay)  # a straggler: slower training, still stoppable
        train_seconds = time.perf_counter() - t1
        metrics.update(evaluated)
        self._check_stop()
        t2 = time.perf_counter()
        weights = self._privatise(spec, trainer.weights(), base)
        metrics.update(train_seconds=train_seconds, fetch_seconds=fetch_seconds, setup_seconds=setup_seconds,
                       push_time=time.time())
        out = stages.outgoing(trainer.names, weights, base, trainer.num_examples, metrics)
        compression = out.compression
        pushed = transfer.push_update(st, self.client_id, round_no, out.num_examples, out.metrics, out.names,
                                      out.tensors, chunk_bytes=self.settings.chunk_bytes,
                                      max_bytes=self.settings.max_update_bytes, signer=self.signer,
                                      compression=compression, window=spec.staleness_limit)
        push_ms = (time.perf_counter() - t2) * 1000  # the push itself: not the heartbeat written after it
        stages.after_push(pushed.outcome)
        if pushed.outcome == Push.OK and self._beat is not None:
            self._beat.update(round=round_no, last_push=time.time())
        note = f" in {pushed.parts} parts" if pushed.parts else ""
        if compression is not None:
            note = f" as {spec.compression} (relative error {metrics['compression_error']:.2e})"
        log.info("%s round %d: loss %.4f accuracy %.4f, trained %.2f s, pushed %d bytes%s in %.1f ms (%s)",
                 self.client_id, round_no, metrics["loss"], metrics.get("accuracy", float("nan")), train_seconds,
                 pushed.nbytes, note, push_ms, pushed.outcome)
        return pushed.outcome

    def _fetch(self, st: RunStore, trainer: Trainer, round_no: int) -> list[np.ndarray] | None:
        """Stage 1: load the global model of round_no - 1 into the trainer and return it (None
        when the commit moved on while we read: the round is not ours to train any more)."""
        payload, self._prefetched = self._prefetched, None
        try:
            if payload is not None:  # read with the state that opened this round
                g_round, names, tensors = transfer.read_global(st, payload)
            else:
                g_round, names, tensors = self.read_global(st)
        except transfer.PartsGone:
            return None  # the commit moved on twice while we read
        if g_round != round_no - 1:
            return None
        if names != trainer.names:
            raise FedqError(f"{self.client_id}: the global model's layers do not match the local model")
        trainer.load(tensors)
        return tensors

    def _privatise(self, spec: RunSpec, weights: list[np.ndarray], base: list[np.ndarray]) -> list[np.ndarray]:
        """Stage 3: with local DP, the update clipped and noised, so only the noised model leaves."""
        if spec.dp == "local" and spec.dp_clip is not None and spec.dp_noise is not None:
            # Fresh OS entropy: noise the aggregator could regenerate would protect nothing.
            return privacy.privatize(weights, base, spec.dp_clip, spec.dp_noise, self._dp_rng)
        return weights

    def _encode(self, spec: RunSpec, round_no: int, names: list[str], weights: list[np.ndarray],
                base: list[np.ndarray], metrics: dict[str, float],
                ) -> tuple[list[str], list[np.ndarray], dict[str, Any] | None]:
        """Stage 4: what travels. With compression (float16, int8), the delta from the global
        model the round trained from, encoded so (its error and bytes go into metrics); float32
        weights otherwise, or when the delta cannot be encoded."""
        if spec.compression == "none":
            return names, weights, None
        try:
            packed = messages.compress_update(names, weights, base, spec.compression)
        except CompressionError as exc:
            # float32 weights are always accepted; the aggregator judges them as usual.
            log.warning("%s round %d: cannot encode the update as %s (%s); sending float32 weights",
                        self.client_id, round_no, spec.compression, exc)
            metrics["compression_fallback"] = 1.0
            return names, weights, None
        metrics.update(packed.metrics)
        return list(packed.names), list(packed.tensors), dict(packed.descriptor)

    def _evaluate(self, trainer: Trainer) -> dict[str, float]:
        """eval_* metrics of the loaded model on this client's held-out rows ({} when it has none)."""
        x_val, y_val = getattr(self, "_val", (None, None))
        if x_val is None or y_val is None or len(y_val) == 0 or not isinstance(trainer, Evaluates):
            return {}
        return trainer.evaluate(x_val, y_val)

    def _final_eval(self, st: RunStore, spec: RunSpec, trainer: Trainer, round_no: int) -> None:
        """Evaluate the last global model on the held-out rows and push the result."""
        if spec.sampled and not st.is_selected(round_no + 1, self.client_id):
            return
        g_round, names, tensors = self.read_global(st)
        if g_round != round_no or names != trainer.names:
            return
        trainer.load(tensors)
        metrics = self._evaluate(trainer)
        if not metrics:
            return
        result = st.push_eval(self.client_id, round_no, evaluation.encode_eval(st.run_id, round_no, self.client_id,
                                                                                metrics),
                              evaluation.MAX_EVAL_BYTES)
        log.info("%s: final model on %d held-out rows: loss %.4f accuracy %.4f (%s)", self.client_id,
                 int(metrics["eval_examples"]), metrics["eval_loss"], metrics["eval_accuracy"], result)


def _with_own_test_rows(part: ClientData, data: DataSpec) -> ClientData:
    """A site's own file keeps the run's test fraction of its rows out of training; no one else
    measures on them, so they are the site's validation rows (with any the run asks for): its
    eval_* metrics of each global model, and of the final one when the run evaluates at the end."""
    x_test, y_test = load_test(data)
    return dataclasses.replace(part, x_val=np.concatenate([part.x_val, x_test]),
                               y_val=np.concatenate([part.y_val, y_test]))


def _vanished(run_id: str) -> str:
    return f"run {run_id} vanished from Redis (restarted without persistence, or flushed)"
