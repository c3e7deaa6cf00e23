"""A stand-in for the Keras trainer: trains nothing, returns chosen weights, quickly.

It has the trainer_factory signature of fedq.roles.client.Client, so a real client process
or thread runs the real protocol with it while the test decides what the update holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from fedq.learning.spec import RunSpec

Step = Callable[[list[np.ndarray], int], list[np.ndarray]]


def nan_step(tensors: list[np.ndarray], round_no: int) -> list[np.ndarray]:
    """Every weight NaN: an update the aggregator must refuse."""
    return [np.full(t.shape, np.nan, dtype=t.dtype) for t in tensors]


def shift_step(delta: float) -> Step:
    """The global model plus delta everywhere: a predictable, finite update."""
    return lambda tensors, round_no: [(t + delta).astype(t.dtype) for t in tensors]



NO_STEP = shift_step(0.0)  # training that leaves the global model as it is

class FakeTrainer:
    """load() keeps the global model, train() sleeps ``seconds`` and reports fixed metrics,
    weights() is ``step(global model, round)``; ``names`` are the model's layer names (the client
    checks them against the global model's) and ``num_examples`` the count it claims."""

    def __init__(self, step: Step = NO_STEP, *, names: list[str], num_examples: int,
                 seconds: float = 0.0, metrics: dict[str, float] | None = None) -> None:
        self.step = step
        self.names = names
        self.num_examples = num_examples
        self.seconds = seconds
        self.metrics = metrics or {"loss": 1.0, "accuracy": 0.5}
        self.tensors: list[np.ndarray] = []
        self.round = 0

    @classmethod
    def factory(cls, step: Step, *, names: Callable[[], list[str]], seconds: float = 0.0,
                metrics: dict[str, float] | None = None) -> Callable[..., FakeTrainer]:
        """A Client trainer_factory: a FakeTrainer claiming the shard's row count, with the layer
        names ``names()`` gives when the client builds it (e.g. read from the run's global model)."""
        def make(spec: RunSpec, num_features: int, num_classes: int, x: np.ndarray, y: np.ndarray, shard: int,
                 stop: threading.Event) -> FakeTrainer:
            return cls(step, names=names(), num_examples=len(y), seconds=seconds, metrics=metrics)
        return make

    def load(self, tensors: list[np.ndarray]) -> None:
        self.tensors = [np.array(t, copy=True) for t in tensors]

    def train(self, round_no: int) -> dict[str, float]:
        self.round = round_no
        if self.seconds:
            time.sleep(self.seconds)
        return dict(self.metrics)

    def weights(self) -> list[np.ndarray]:
        return self.step(self.tensors, self.round)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return {}  # no model to evaluate: the update carries no federated evaluation
