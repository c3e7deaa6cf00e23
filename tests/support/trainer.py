"""A stand-in for the Keras trainer: trains nothing, returns chosen weights, quickly.

It has the trainer_factory signature of fedq.roles.client.Client, so a real client process
or thread runs the real protocol with it while the test decides what the update holds."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np

from fedq.learning.spec import RunSpec

Step = Callable[[list[np.ndarray], int], list[np.ndarray]]


def nan_step(tensors: list[np.ndarray], round_no: int) -> list[np.ndarray]:
    """Every weight NaN: an update the aggregator must refuse."""
    return [np.full(t.shape, np.nan, dtype=t.dtype) for t in tensors]


def shift_step(delta: float) -> Step:
    """The global model plus delta everywhere: a predictable, finite update."""
    return lambda tensors, round_no: [(t + delta).astype(t.dtype) for t in tensors]


class FakeTrainer:
    """load() keeps the global model, train() sleeps ``seconds`` and reports fixed metrics,
    weights() is ``step(global model, round)``."""

    def __init__(self, step: Step = shift_step(0.0), *, seconds: float = 0.0,
                 metrics: dict[str, float] | None = None) -> None:
        self.step = step
        self.seconds = seconds
        self.metrics = metrics or {"loss": 1.0, "accuracy": 0.5}
        self.tensors: list[np.ndarray] = []
        self.round = 0

    @classmethod
    def factory(cls, *args: Any, **kw: Any) -> Callable[..., "FakeTrainer"]:
        """A Client trainer_factory building FakeTrainer(*args, **kw) whatever the data."""
        def make(spec: RunSpec, num_features: int, num_classes: int, x: np.ndarray, y: np.ndarray, shard: int,
                 stop: threading.Event) -> FakeTrainer:
            return cls(*args, **kw)
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
