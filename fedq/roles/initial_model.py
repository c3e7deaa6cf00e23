"""The run's initial global model, built in a child process: initialising a Keras model takes
several times its size, which then never enters the aggregator's own memory."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

from fedq.errors import ConfigError
from fedq.learning.models import build_model, weight_names
from fedq.learning.spec import load_spec
from fedq.protocol import transfer
from fedq.protocol.store import RunStore, connect
from fedq.roles.localredis import die_with_parent
from fedq.settings import Settings


def initial_global(settings: Settings, run_id: str, model_name: str, num_features: int, num_classes: int,
                   tick: Callable[[], None]) -> bytes:
    """The initial global model's payload, built by a child process that writes its parts and
    exits: initialising a Keras model takes several times its size (3.3 GB at peak for 250M
    parameters). tick is called while the child works (it keeps the lease, honours stop requests)."""
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
                raise ConfigError(f"building the initial model {model_name!r} failed: its process "
                                  f"exited with code {proc.exitcode}")
            tick()
        # (True, the payload) or (False, why building it failed): see write_initial_global
        answer: tuple[bool, bytes | str] = recv.recv()
        answered = True
    finally:
        if not answered:
            proc.kill()  # stopped or failed: its model is of no use now
        # Having answered, the child exits on its own; its teardown (TensorFlow's, freeing the
        # model) can take seconds on a loaded machine, which are not waited for here: a wait
        # without renewing the lease once cost it. Until the work horse ends, an exited child
        # is a zombie: a process-table entry, no memory.
        proc.join(timeout=0)
        recv.close()
    ok, value = answer
    if not ok or not isinstance(value, bytes):
        raise ConfigError(str(value))
    return value


def write_initial_global(settings: Settings, run_id: str, num_features: int, num_classes: int,
                         conn: Any) -> None:
    """Child process of initial_global: build the run's model, write the initial
    global model's parts and send back (True, payload to commit), or (False, why it failed)."""
    die_with_parent()  # an aggregator killed mid-build takes its builder with it
    try:
        store = RunStore(connect(settings), run_id)
        spec = load_spec(store)
        model = build_model(spec.model, num_features, num_classes, spec.seed)
        weights, names = model.get_weights(), weight_names(model)
        del model  # Keras' variables go before the parts are made
        payload, _ = transfer.encode_global(store, 0, names, weights, settings.chunk_bytes)
        conn.send((True, payload))
    except Exception as exc:  # reported to the aggregator, which fails the run
        conn.send((False, f"building the initial model failed: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()
