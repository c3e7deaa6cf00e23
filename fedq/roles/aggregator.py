"""The aggregator: drives one run's rounds (fedq.roles.jobs.drive_run is the rq job that runs it)."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from fedq.errors import CodecError, ConfigError, DataError, FedqError, RoundTimeout, SecAggError
from fedq.learning import privacy
from fedq.learning.data import load_dataset, split_indices, standardize
from fedq.learning.models import build_model, evaluate, keras_file, weight_names
from fedq.learning.spec import RunSpec, load_spec
from fedq.learning.strategies import Strategy, held_bytes, select_clients
from fedq.protocol import chunking, heartbeat, messages, transfer
from fedq.protocol.signing import Verifier
from fedq.protocol.store import Commit, LeaseLost, RunStore
from fedq.protocol.vocabulary import ENDED, Phase
from fedq.roles import initial, record, secure
from fedq.roles import metrics as fedq_metrics
from fedq.roles.admission import Admission
from fedq.roles.buffered import Buffering
from fedq.roles.evaluating import FederatedEvaluation
from fedq.roles.judging import Judging, Round
from fedq.settings import Settings

log = logging.getLogger("fedq.roles.aggregator")


LIVENESS_CHECK_SECONDS = 0.5  # how often a round due updates looks at its members' heartbeats


class AggregatorStopped(FedqError):
    """The aggregator was asked to stop; the run stays as it is for another driver to resume."""


class RunVanished(FedqError):
    """The run's keys disappeared from Redis (restarted without persistence, or flushed)."""


@dataclass
class _Driving:
    """What the rounds of one driving session share (small; the models live in the strategy)."""

    spec: RunSpec
    model: Any  # the Keras model for central evaluation; None without it
    num_classes: int
    template: list[messages.TensorSpec]
    wire: list[messages.TensorSpec]  # what updates must look like (the template, or masked vectors)
    strategy: Strategy
    stream: bool  # the next global model is written slice by slice from the sum (lean, in parts)
    x_test: np.ndarray
    y_test: np.ndarray
    round_no: int  # the last committed round
    global_tensors: list[np.ndarray] | None  # the global model rounds train from (None when lean)
    fed_eval: bool
    round_started: float


@dataclass
class _Prepared:
    """What driving a run needs, built before taking the lease (the slow part)."""

    ds: Any
    test_idx: np.ndarray
    model: Any = None  # the Keras model for central evaluation; None without it
    names: list[str] = field(default_factory=list)  # the model's weight names (with a model)
    strategy: Strategy | None = None  # None until the model's shapes are known


class Aggregator(Admission, FederatedEvaluation, Judging, Buffering):
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

    def _prepare(self, spec: RunSpec) -> _Prepared:
        """The test split, the model and the strategy: everything driving needs, built once.
        Without central evaluation the aggregator has no use for the Keras model: it never
        loads TensorFlow, and the strategy waits for the model's shapes (_strategy_for)."""
        ds = load_dataset(spec.data)
        _, test_idx = split_indices(ds.y, spec.data.test_fraction, spec.data.seed)
        if not spec.central_eval:
            return _Prepared(ds, test_idx)
        model = build_model(spec.model, ds.num_features, ds.num_classes, spec.seed)
        weights = model.get_weights()
        return _Prepared(ds, test_idx, model, weight_names(model), self._new_strategy(spec, weights))

    def _strategy_for(self, spec: RunSpec, template: list[messages.TensorSpec]) -> Strategy:
        """The strategy for a model known by its shapes alone. The zero tensors cost no memory
        until written: numpy maps large zero arrays lazily, and a streaming strategy never
        writes its template."""
        return self._new_strategy(spec, [np.zeros(t.shape, dtype=np.dtype(t.dtype)) for t in template])

    def _new_strategy(self, spec: RunSpec, weights: list[np.ndarray]) -> Strategy:
        """The run's strategy (with secure aggregation, the masked-sum accumulator in its place)."""
        if spec.secure_aggregation:
            return secure.SecureSum(spec, weights, self.store, self._tick, self.settings.block_seconds)
        strategy = Strategy(spec.strategy, weights, dp=spec.central_dp)
        self._check_memory(spec, strategy, weights)
        return strategy

    def _initial_global(self, spec: RunSpec, num_features: int, num_classes: int) -> bytes:
        """Round 0's model: the one the run's submitter stored with it (fedq.roles.initial), else
        built by a child process, so that its building peak never enters this one."""
        submitted = initial.submitted_initial(self.store)
        if submitted is not None:
            log.info("run %s: the initial model came with the run", self.run_id)
            return submitted
        initial.need_tensorflow(self.run_id)
        return initial.build_in_child(self.settings, self.run_id, num_features, num_classes, self._tick)

    def _run(self, spec: RunSpec, prepared: _Prepared) -> dict[str, Any]:
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

    def _open_training(self, spec: RunSpec, prepared: _Prepared) -> tuple[np.ndarray, np.ndarray]:
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

    def _driving(self, spec: RunSpec, prepared: _Prepared, mean: np.ndarray, std: np.ndarray) -> _Driving:
        """Everything the rounds share, read from Redis as the last commit left it."""
        ds, model = prepared.ds, prepared.model
        g_tensors: list[np.ndarray] | None = None
        if model is not None:  # the model is read whole anyway: its template comes with it
            round_no, g_names, g_tensors = transfer.read_global(self.store)
            template = messages.template_of(g_names, g_tensors)
        else:
            round_no, template = transfer.global_template(self.store)
        strategy = prepared.strategy or self._strategy_for(spec, template)
        # Lean: no central evaluation, and the next global model is the plain mean of the
        # updates, so no round needs the previous one; when it travels in parts it is written
        # out slice by slice from the float64 sum. Memory: that sum and a part, whatever N is.
        lean = model is None and strategy.streams_result and spec.compression == "none"
        if g_tensors is None and not lean:
            g_tensors = transfer.read_global(self.store)[2]
        # Server optimiser state (momentum, Adam moments) was committed with this global model.
        strategy.load_state(self.store.server_state_payload(), round_no)
        wire = secure.wire_template(template) if spec.secure_aggregation else template
        return _Driving(spec=spec, model=model, num_classes=ds.num_classes, template=template, wire=wire,
                        strategy=strategy,
                        stream=lean and chunking.should_chunk(template, self.settings.chunk_bytes),
                        x_test=standardize(ds.x[prepared.test_idx], mean, std), y_test=ds.y[prepared.test_idx],
                        round_no=round_no, global_tensors=g_tensors, fed_eval=spec.data.val_fraction > 0,
                        round_started=time.time())

    def _drive_round(self, drive: _Driving) -> None:
        """One round, as stages: collect (judge and fold) -> write the next global model ->
        evaluate it -> record -> commit."""
        spec, round_no, strategy = drive.spec, drive.round_no, drive.strategy
        strategy.begin_round(drive.global_tensors, noise_rng=self._noise_rng(spec, round_no))
        rnd = self._collect_round(spec, round_no, drive.wire, strategy, drive.global_tensors or [])
        weights, payload, parts = self._write_global(drive)
        test, eval_seconds = self._evaluate(drive, weights)
        metrics = self._record(drive, rnd, test, eval_seconds)
        self._commit(drive, rnd, payload, parts, metrics)
        log.info("run %s round %d/%d: %d updates, %d examples, test accuracy %s", self.run_id, round_no,
                 spec.rounds, metrics["num_updates"], metrics["num_examples"],
                 "-" if "accuracy" not in test else f"{test['accuracy']:.4f}")
        drive.round_started = time.time()
        drive.global_tensors = weights

    def _write_global(self, drive: _Driving) -> tuple[list[np.ndarray] | None, bytes, int]:
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

    def _evaluate(self, drive: _Driving, weights: list[np.ndarray] | None) -> tuple[dict[str, Any], float]:
        """Central evaluation of the new global model on the held-out test split ({} without it)."""
        t0 = time.perf_counter()
        if drive.model is None or weights is None:
            return {}, 0.0
        drive.model.set_weights(weights)
        return evaluate(drive.model, drive.x_test, drive.y_test, drive.num_classes), time.perf_counter() - t0

    def _record(self, drive: _Driving, rnd: Round, test: dict[str, Any], eval_seconds: float) -> dict[str, Any]:
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

    def _commit(self, drive: _Driving, rnd: Round, payload: bytes, parts: int, metrics: dict[str, Any]) -> None:
        """Commit the round: the global model, counter, record, server state and the next
        round's chosen clients in one fenced step."""
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
            update_parts=sorted(rnd.part_keys), stale_parts=stale, model_file=model_file, members=rnd.members))
        if committed:
            fedq_metrics.observe_round(metrics["seconds"])
        else:
            log.info("run %s round %d was committed already", self.run_id, round_no)

    def _model_file(self, drive: _Driving) -> bytes | None:
        """The final global model as a .keras file, committed with the last round for the
        dashboard's model.keras; None without a Keras model here (a lean aggregator never loads
        TensorFlow), over FEDQ_MAX_MODEL_FILE_BYTES, or when Keras cannot save the model."""
        limit = self.settings.max_model_file_bytes
        if drive.model is None or limit <= 0:
            return None
        weights = sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in drive.template)
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

    # --- strategies and sampling -----------------------------------------------------------
    def _noise_rng(self, spec: RunSpec, round_no: int) -> np.random.Generator | None:
        """Central DP: the round's noise source (keyed by FEDQ_DP_NOISE_KEY when set); else None."""
        if spec.central_dp is None:
            return None
        return privacy.noise_rng(self.settings.dp_noise_key, self.run_id, spec.seed, round_no)

    def _check_memory(self, spec: RunSpec, strategy: Strategy, template: list[np.ndarray]) -> None:
        """Refuse a run whose robust strategy would hold more than the cap in memory."""
        if not strategy.holds_all:
            return
        n = spec.clients_per_round
        need = held_bytes(template, n)
        cap = spec.strategy.max_held_mb * 2 ** 20
        if need > cap:
            raise ConfigError(
                f"strategy {spec.strategy.name} holds all {n} updates of a round in memory: {n} x "
                f"{need / n / 2 ** 20:.2f} MiB = {need / 2 ** 20:.1f} MiB exceeds the cap of "
                f"{spec.strategy.max_held_mb:g} MiB (--max-held-mb); use fewer clients per round "
                f"(--fraction-fit), a smaller model, or a streaming strategy such as fedavg")

    def _select(self, spec: RunSpec, round_no: int) -> list[str] | None:
        """The clients chosen for round_no (None: every client trains), from the joined ids."""
        if not spec.sampled:
            return None
        return select_clients(self.store.clients(), spec.fraction_fit, spec.seed, round_no)

    def _wait_quorum(self, spec: RunSpec, what: str, have: Callable[[], int], on_idle: Callable[[], None],
                     on_wake: Callable[[str], None], expected: int | None = None, quorum: int | None = None,
                     settled: Callable[[int], bool] | None = None) -> None:
        """Block until all expected clients answered, or a deadline passes with at least the quorum,
        or settled(quorum) says nobody else can answer (the rest are gone) with the quorum in.

        expected and quorum default to the run's; a round that samples clients expects only those.
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
            for cid in woken:
                self._tick()  # a wake-up may name hundreds (a join phase): keep the lease through them
                on_wake(cid)

    def _collect_round(self, spec: RunSpec, round_no: int, template: list[messages.TensorSpec],
                       strategy: Strategy, base: list[np.ndarray]) -> Round:
        """Block until every joined (or chosen) client has a stored update for the round (valid or
        refused), or the deadline passes with the quorum. strategy has begun the round; base is
        the global model it started from (compressed updates are deltas from it)."""
        rnd = Round(acc=strategy, joined=self._joined(), base=base, compression=spec.compression, template=template)
        if spec.sampled:
            rnd.selected = self.store.selected(round_no)
            if rnd.selected is None:  # written with the commit that opened the round; never absent
                raise RoundTimeout(f"round {round_no}: the clients chosen to train are missing from Redis")
        sharers = secure.eligible(strategy)  # secure aggregation: only a client that shared can be unmasked
        if sharers is not None:
            rnd.selected = sharers if rnd.selected is None else rnd.selected & sharers

        def rescan(joined_now: bool = False) -> None:
            # Wake-ups are hints; the sequence numbers are the truth. An idle moment re-reads
            # them, so a wake-up lost to a dropped connection costs a second, not the round.
            self._check_exists()
            if not joined_now:
                rnd.joined = self._joined()  # late joiners count from now on
            fedq_metrics.set_clients_alive(heartbeat.count_alive_clients(self.r, self.run_id, sorted(rnd.joined)))
            self._admit_waiting(spec, rnd)
            # The members were read a moment ago (joined_now): not again. A member without a
            # readable join record is looked at by the next idle rescan, or its wake-up.
            for cid, seq in self.store.update_seqs(round_no, sorted(rnd.joined) if joined_now else None).items():
                if rnd.versions.get(cid) != seq:
                    self._consider(rnd, round_no, cid, template)

        def woken(cid: str) -> None:
            self._admit_woken(spec, rnd, cid)
            self._consider(rnd, round_no, cid, template)

        rescan(joined_now=True)  # a resumed round: fold what is already stored
        expected = rnd.expected(spec)
        self._wait_quorum(spec, f"round {round_no}", lambda: rnd.responded, rescan, woken,
                          expected=expected, quorum=min(spec.quorum, expected),
                          settled=lambda quorum: self._settled(rnd, quorum))
        # Close the round, then take in whatever was stored before the close: after this no
        # push can change it, so what we commit is exactly what was accepted. One round trip.
        rnd.members, seqs = self.store.close_and_look(round_no, sorted(rnd.joined))
        for cid, seq in seqs.items():
            if rnd.versions.get(cid) != seq:
                self._consider(rnd, round_no, cid, template)
        if not rnd.folded:
            raise RoundTimeout(f"round {round_no}: every update was refused")
        self._cap_shares(spec, rnd, round_no, template)
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
