"""A run's initial global model, stored with the run as its submitter stores it (fedq.roles.initial).

Without it, every aggregator that starts a run without central evaluation builds the initial
model in a child process of its own, and that child imports TensorFlow: seconds of CPU per run on
a small machine. A test about the protocol rather than the initial model calls ``store_initial``
before any aggregator starts (before or after the run is created): the aggregator then commits
this model ("the initial model came with the run"). ``PrestoredFederation`` is the in-process
``Federation`` with its run's initial model stored so.

The built-in networks on the built-in data (30 features, 2 classes) are made with numpy: the
names and shapes Keras gives them, seeded noise for values (no TensorFlow in the test process).
Any other model or data is built by fedq itself (``build_model``), once per test process.
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

BUILT_IN_DATA = (30, 2)  # features, classes of the built-in data set
SHAPES: dict[str, list[tuple[str, tuple[int, ...]]]] = {
    "seed": [("000:seed_cnn/conv1d/kernel", (3, 1, 4)), ("001:seed_cnn/conv1d/bias", (4,)),
             ("002:seed_cnn/dense/kernel", (36, 8)), ("003:seed_cnn/dense/bias", (8,)),
             ("004:seed_cnn/dense/kernel", (8, 2)), ("005:seed_cnn/dense/bias", (2,))],
    "mlp": [("000:mlp/dense/kernel", (30, 16)), ("001:mlp/dense/bias", (16,)),
            ("002:mlp/dense/kernel", (16, 2)), ("003:mlp/dense/bias", (2,))],
}


def initial_tensors(model: str = "seed", seed: int = 0) -> tuple[list[str], list[np.ndarray]]:
    """(names, float32 tensors) shaped as the built-in ``model`` ('seed' or 'mlp') on the built-in data."""
    rng = np.random.default_rng(seed)
    names = [name for name, _ in SHAPES[model]]
    return names, [rng.normal(0, 0.1, shape).astype(np.float32) for _, shape in SHAPES[model]]


@functools.cache
def _built(model: str, num_features: int, num_classes: int, seed: int) -> tuple[list[str], list[np.ndarray]]:
    from fedq.learning.models import build_model, weight_names

    built = build_model(model, num_features, num_classes, seed)
    return weight_names(built), built.get_weights()


def store_initial(r: redis.Redis, run_id: str, chunk_bytes: int | None = None) -> tuple[list[str], list[np.ndarray]]:
    """Store run_id's initial global model with the run, in parts of chunk_bytes (default:
    fedq's setting) as an aggregator would write them; returns (names, tensors). The model is
    the run's (its spec read from Redis), or the seed network when the run is not created yet."""
    store = RunStore(r, run_id)
    if store.exists():
        spec = load_spec(store)
        ds = load_dataset(spec.data)
        shape = (ds.num_features, ds.num_classes)
        if spec.model in SHAPES and shape == BUILT_IN_DATA:
            names, tensors = initial_tensors(spec.model, spec.seed)
        else:
            names, tensors = _built(spec.model, *shape, spec.seed)
    else:
        names, tensors = initial_tensors("seed")
    size = chunk_bytes if chunk_bytes is not None else Settings.from_env(env={}).chunk_bytes
    payload, _ = transfer.encode_global(store, 0, names, tensors, size)
    store.set_initial(payload)
    return names, tensors


class PrestoredFederation(Federation):
    """``support.federation.Federation`` whose run comes with its initial model (store_initial,
    in the run's chunk_bytes) before its first aggregator starts; otherwise the same."""

    def start_aggregator(self) -> Aggregator:
        if not self.aggs:
            store_initial(self.store.r, self.spec.run_id, self.settings.chunk_bytes)
        return super().start_aggregator()
