"""A run's initial global model made with numpy and stored with the run before its aggregator
starts, as ``fedq submit`` stores one (fedq.roles.initial): the aggregator then commits it and
spawns no child to build one, so no process of the run imports TensorFlow.

For runs without central evaluation whose clients do not train with Keras (direct pushes,
FakeTrainer): the tensors have the names and shapes of the built-in networks on the built-in data
(30 features, 2 classes); their values are seeded noise, not Keras' initialisation.
"""

from __future__ import annotations

import numpy as np
import redis

from fedq.protocol import transfer
from fedq.protocol.store import RunStore

SHAPES: dict[str, list[tuple[str, tuple[int, ...]]]] = {
    "seed": [("000:seed_cnn/conv1d/kernel", (3, 1, 4)), ("001:seed_cnn/conv1d/bias", (4,)),
             ("002:seed_cnn/dense/kernel", (36, 8)), ("003:seed_cnn/dense/bias", (8,)),
             ("004:seed_cnn/dense/kernel", (8, 2)), ("005:seed_cnn/dense/bias", (2,))],
    "mlp": [("000:mlp/dense/kernel", (30, 16)), ("001:mlp/dense/bias", (16,)),
            ("002:mlp/dense/kernel", (16, 2)), ("003:mlp/dense/bias", (2,))],
}


def initial_tensors(model: str = "seed", seed: int = 0) -> tuple[list[str], list[np.ndarray]]:
    """(names, float32 tensors) shaped as the built-in ``model`` ('seed' or 'mlp')."""
    rng = np.random.default_rng(seed)
    names = [name for name, _ in SHAPES[model]]
    return names, [rng.normal(0, 0.1, shape).astype(np.float32) for _, shape in SHAPES[model]]


def store_initial(r: redis.Redis, run_id: str, model: str = "seed", chunk_bytes: int = 0,
                  seed: int = 0) -> tuple[list[str], list[np.ndarray]]:
    """Store ``initial_tensors(model, seed)`` as run_id's initial model (in parts of chunk_bytes
    when it is larger; 0: whole), before or after the run is created but before its join phase
    ends; returns (names, tensors)."""
    names, tensors = initial_tensors(model, seed)
    store = RunStore(r, run_id)
    payload, _ = transfer.encode_global(store, 0, names, tensors, chunk_bytes)
    store.set_initial(payload)
    return names, tensors
