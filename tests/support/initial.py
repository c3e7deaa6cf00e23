"""A run's initial global model, stored with the run as its submitter stores it (fedq.roles.initial).

Without it, every aggregator that starts a run builds the initial model in a child process of its
own, and that child imports TensorFlow: seconds of CPU per run on a small machine. A test about
the protocol rather than the initial model calls ``store_initial`` after creating the run (e.g.
after ``fedq submit``) and before any aggregator starts: the aggregator then commits this model
("the initial model came with the run"), as it does for a run submitted without central
evaluation. The weights are fedq's own (``build_model``, the same name, shape and seed give the
same weights), built once per test process and kept. ``PrestoredFederation`` is the in-process
``Federation`` with its run's initial model stored so.
"""

from __future__ import annotations

import functools

import numpy as np
import redis

from fedq.learning.data import load_dataset
from fedq.learning.spec import load_spec
from fedq.protocol import transfer
from fedq.protocol.store import RunStore
from fedq.roles.aggregator import Aggregator
from fedq.settings import Settings
from support.federation import Federation


@functools.cache
def _weights(model: str, num_features: int, num_classes: int, seed: int) -> tuple[list[str], list[np.ndarray]]:
    from fedq.learning.models import build_model, weight_names

    built = build_model(model, num_features, num_classes, seed)
    return weight_names(built), built.get_weights()


def store_initial(r: redis.Redis, run_id: str, chunk_bytes: int | None = None) -> None:
    """Store run_id's initial global model with the run (its spec read from Redis), its parts
    in chunk_bytes (default: fedq's setting) as an aggregator would write them."""
    store = RunStore(r, run_id)
    spec = load_spec(store)
    ds = load_dataset(spec.data)
    names, weights = _weights(spec.model, ds.num_features, ds.num_classes, spec.seed)
    size = chunk_bytes if chunk_bytes is not None else Settings.from_env(env={}).chunk_bytes
    payload, _ = transfer.encode_global(store, 0, names, weights, size)
    store.set_initial(payload)


class PrestoredFederation(Federation):
    """``support.federation.Federation`` whose run comes with its initial model (store_initial,
    in the run's chunk_bytes) before its first aggregator starts; otherwise the same."""

    def start_aggregator(self) -> Aggregator:
        if not self.aggs:
            store_initial(self.store.r, self.spec.run_id, self.settings.chunk_bytes)
        return super().start_aggregator()
