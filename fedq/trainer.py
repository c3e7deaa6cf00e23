"""Local training behind a small interface, so the client loop does not depend on Keras.

``KerasTrainer`` is what real clients use. Simulations and benchmarks may pass any object
with the same methods (numpy only), and still run the real client loop against Redis.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import numpy as np

from fedq.models import _keras, build_model, compile_model, to_model_input, weight_names
from fedq.spec import RunSpec


class Trainer(Protocol):
    """What the client loop needs from local training."""

    names: list[str]
    num_examples: int

    def load(self, tensors: list[np.ndarray]) -> None:
        """Set the model to the global weights."""

    def train(self, round_no: int) -> dict[str, float]:
        """Train locally for one round; returns metrics (at least loss and accuracy)."""

    def weights(self) -> list[np.ndarray]:
        """The locally trained weights, in ``names`` order."""


class KerasTrainer:
    """The run's Keras model trained on this client's standardised rows."""

    def __init__(self, spec: RunSpec, num_features: int, num_classes: int, x: np.ndarray, y: np.ndarray,
                 shard: int, stop: threading.Event, threads: int = 0) -> None:
        if threads > 0:
            _limit_tf_threads(threads)
        self.spec = spec
        self.shard = shard
        self.x = to_model_input(x)
        self.y = y
        self.num_examples = int(len(y))
        self.model = build_model(spec.model, num_features, num_classes, spec.seed)
        compile_model(self.model, spec.optimizer, spec.learning_rate)
        # Build the optimizer now and keep its fresh state: each round starts local training afresh.
        self.model.optimizer.build(self.model.trainable_variables)
        self._fresh = [np.array(v.numpy()) for v in self.model.optimizer.variables]
        self.names = weight_names(self.model)
        self._callbacks = [_stop_callback(stop)]

    def load(self, tensors: list[np.ndarray]) -> None:
        self.model.set_weights(tensors)
        for var, value in zip(self.model.optimizer.variables, self._fresh):
            var.assign(value)

    def train(self, round_no: int) -> dict[str, float]:
        import keras

        # A seed per (run, shard, round): reproducible, yet each client shuffles differently.
        keras.utils.set_random_seed(self.spec.seed * 1_000_003 + self.shard * 1009 + round_no)
        history = self.model.fit(self.x, self.y, epochs=self.spec.local_epochs, batch_size=self.spec.batch_size,
                                 shuffle=True, verbose=0, callbacks=self._callbacks)
        return {"loss": float(history.history["loss"][-1]), "accuracy": float(history.history["accuracy"][-1])}

    def weights(self) -> list[np.ndarray]:
        return self.model.get_weights()


def _limit_tf_threads(n: int) -> None:
    """Cap TensorFlow's thread pools: many clients on few cores otherwise thrash."""
    _keras()  # sets TensorFlow's environment (quiet logs, no oneDNN) before its first import
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:
        pass  # already initialised in this process; the first setting stands


def _stop_callback(stop: threading.Event) -> Any:
    """A Keras callback that ends training at the next batch once stop is set."""
    import keras

    class StopOnSignal(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if stop.is_set():
                self.model.stop_training = True

    return StopOnSignal()
