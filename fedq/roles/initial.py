"""The initial global model: built in a child process, by the aggregator or by a run's submitter.

Building a Keras model takes several times its size (3.3 GB at peak for 250M parameters), so it
happens in a child that writes the model's parts to Redis, sends back the payload to commit, and
exits: that memory never enters the long-lived process. A run without central evaluation needs no
model on the aggregator at all; its submitter (``fedq submit``, ``fedq run``), which has
TensorFlow, stores the initial model with the run, and a slim aggregator (no TensorFlow,
``deploy/requirements/aggregator.txt``) commits that instead of building one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from typing import Any

from fedq.errors import CodecError, ConfigError, DataError
from fedq.learning.data import load_dataset
from fedq.learning.dataspec import DataSpec
from fedq.learning.models import build_model, keras_installed, weight_names
from fedq.learning.spec import RunSpec, load_spec
from fedq.protocol import messages, transfer
from fedq.protocol.connection import connect
from fedq.protocol.store import RunStore
from fedq.roles.localredis import die_with_parent
from fedq.settings import Settings

log = logging.getLogger("fedq.roles.initial")


def build_in_child(settings: Settings, run_id: str, num_features: int, num_classes: int,
                   on_wait: Callable[[], None] = lambda: None) -> bytes:
    """The initial global model's payload, its parts written, from a child process; on_wait is
    called every settings.block_seconds while it works (the aggregator renews its lease there)."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=write_initial_global, name="fedq-initial-model", daemon=True,
                       args=(settings, run_id, num_features, num_classes, send))
    proc.start()
    send.close()
    answered = False
    try:
        while not recv.poll(settings.block_seconds):  # at most a third of the lease
            if not proc.is_alive() and not recv.poll(0):
                raise ConfigError(f"building the initial model of run {run_id} failed: its process "
                                  f"exited with code {proc.exitcode}")
            on_wait()  # may raise (a stop request): the finally below kills the child
        # (True, the payload) or (False, why building it failed): see write_initial_global
        answer: tuple[bool, bytes | str] = recv.recv()
        answered = True
    finally:
        if not answered:
            proc.kill()  # stopped or failed: its model is of no use now
        # Having answered, the child exits on its own; its teardown (TensorFlow's, freeing the
        # model) can take seconds on a loaded machine, which are not waited for here: a wait
        # without renewing the lease once cost it. Until the parent ends, an exited child is a
        # zombie: a process-table entry, no memory.
        proc.join(timeout=0)
        recv.close()
    ok, value = answer
    if not ok or not isinstance(value, bytes):
        raise ConfigError(str(value))
    return value


def write_initial_global(settings: Settings, run_id: str, num_features: int, num_classes: int,
                         conn: Any) -> None:
    """Child process of build_in_child: build the run's model, write the initial global model's
    parts and send back (True, payload to commit), or (False, why it failed)."""
    die_with_parent()  # a parent killed mid-build takes its builder with it
    try:
        store = RunStore(connect(settings), run_id)
        spec = load_spec(store)
        model = build_model(spec.model, num_features, num_classes, spec.seed)
        weights, names = model.get_weights(), weight_names(model)
        del model  # Keras' variables go before the parts are made
        payload, _ = transfer.encode_global(store, 0, names, weights, settings.chunk_bytes)
        conn.send((True, payload))
    except Exception as exc:  # reported to the parent
        conn.send((False, f"building the initial model failed: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()
    # Answered: exit now. TensorFlow's interpreter teardown (freeing the model's runtime) took
    # 1.3 s of CPU on 2 idle cores, spent while the run's first rounds went on; nothing here needs it
    # (the parts are in Redis, the answer is sent, the log handlers are flushed below).
    logging.shutdown()
    os._exit(0)


def _data_here(data: DataSpec) -> bool:
    return all(os.path.exists(p) for p in (data.csv, data.normal_csv, data.abnormal_csv) if p)


def store_with_run(r: Any, settings: Settings, spec: RunSpec) -> bool:
    """For a run without central evaluation, build its initial model here and store it with the
    run (call between creating and enqueuing it); True when stored. Skipped, leaving the
    aggregator to build it, where this install has no TensorFlow or the data is not readable here."""
    if spec.central_eval:
        return False
    if not keras_installed() or not _data_here(spec.data):
        log.info("run %s: the aggregator builds the initial model (%s here)", spec.run_id,
                 "no TensorFlow" if not keras_installed() else "the data is not readable")
        return False
    try:
        ds = load_dataset(spec.data)
        payload = build_in_child(settings, spec.run_id, ds.num_features, ds.num_classes)
    except (ConfigError, DataError) as exc:  # the aggregator tries again, and fails the run if it must
        log.warning("run %s: initial model not stored with the run: %s", spec.run_id, exc)
        return False
    RunStore(r, spec.run_id).set_initial(payload)
    return True


def submitted_initial(store: RunStore) -> bytes | None:
    """The initial model the run's submitter stored, checked to be round 0 of this run; None if none."""
    payload = store.initial_payload()
    if payload is None:
        return None
    round_no = messages.decode_global_any(payload, store.run_id)[0]  # CodecError when it is not one
    if round_no != 0:
        raise CodecError(f"run {store.run_id}: the stored initial model is of round {round_no}, not 0")
    return payload


def need_tensorflow(run_id: str) -> None:
    """ConfigError, with the way forward, when this install cannot build the run's initial model."""
    if not keras_installed():
        raise ConfigError(f"run {run_id} came without an initial model and this aggregator has no TensorFlow "
                          "(a slim install): submit runs without central evaluation with `fedq submit` or "
                          "`fedq run` from a full install, which store the initial model with the run")
