"""Local training behind a small interface, so the client loop does not depend on Keras.

``KerasTrainer`` is what real clients use. Simulations and benchmarks may pass any object
with the same methods (numpy only), and still run the real client loop against Redis.

FedProx (Li et al., 2020): with a proximal coefficient mu > 0, local training minimises
``loss + mu / 2 * ||w - w_global||^2``. It is attached as a regularizer on every trainable
variable, anchored at the global weights of the round, so ``model.fit`` adds the term and its
gradient ``mu * (w - w_global)``; the reported training loss includes it.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedq.learning.evaluation import client_metrics
from fedq.learning.models import _keras, build_model, ensure_compiled, model_input, predict_proba, weight_names
from fedq.learning.spec import RunSpec


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

    # Optional: ``evaluate(x, y) -> dict`` (Evaluates); clients without it skip evaluation.


@runtime_checkable
class Evaluates(Protocol):
    """A trainer that can also evaluate the loaded global model (optional for a Trainer)."""

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """eval_* metrics (eval_loss, eval_accuracy, eval_examples, ...) of the loaded global
        model on standardised held-out rows."""


class KerasTrainer:
    """The run's Keras model trained on this client's standardised rows."""

    def __init__(self, spec: RunSpec, num_features: int, num_classes: int, x: np.ndarray, y: np.ndarray,
                 shard: int, stop: threading.Event, threads: int = 0) -> None:
        if threads > 0:
            _limit_tf_threads(threads)
        self.spec = spec
        self.shard = shard
        self.num_classes = num_classes
        self.num_examples = int(len(y))
        self.model = build_model(spec.model, num_features, num_classes, spec.seed)
        ensure_compiled(self.model, spec.optimizer, spec.learning_rate)
        self.x = model_input(self.model, x)
        self.y = y
        self.mu = spec.strategy.proximal_mu
        self._anchors = _attach_proximal(self.model, self.mu) if self.mu > 0 else []
        # Build the optimizer now and keep its fresh state: each round starts local training afresh.
        if not getattr(self.model.optimizer, "built", False):
            self.model.optimizer.build(self.model.trainable_variables)
        self._fresh = [np.array(v.numpy()) for v in self.model.optimizer.variables]
        self.names = weight_names(self.model)
        self._callbacks = [_stop_callback(stop)]

    @staticmethod
    def devices() -> list[str]:
        """The devices TensorFlow trains on here, e.g. ['CPU:0', 'GPU:0'] (listing them
        does not start TensorFlow's runtime: thread limits set afterwards still hold)."""
        _keras()
        import tensorflow as tf

        return [d.name.removeprefix("/physical_device:") for d in tf.config.list_physical_devices()]

    def load(self, tensors: list[np.ndarray]) -> None:
        self.model.set_weights(tensors)
        for var, value in zip(self.model.optimizer.variables, self._fresh):
            var.assign(value)
        for var, anchor in zip(self.model.trainable_variables, self._anchors):
            anchor.assign(var.value)  # the proximal term pulls towards this round's global model

    def train(self, round_no: int) -> dict[str, float]:
        import keras

        # A seed per (run, shard, round): reproducible, yet each client shuffles differently.
        keras.utils.set_random_seed(self.spec.seed * 1_000_003 + self.shard * 1009 + round_no)
        if self.spec.local_epochs == 1 and self.spec.batch_size >= self.num_examples:
            # One gradient step on all rows (FedSGD): the same step as fit's, without fit's
            # per-call set-up, which costs ~15x the step itself on small data.
            logs = self.model.train_on_batch(self.x, self.y, return_dict=True)
            history = {k: [v] for k, v in logs.items()}
        else:
            history = self.model.fit(self.x, self.y, epochs=self.spec.local_epochs, batch_size=self.spec.batch_size,
                                     shuffle=True, verbose=0, callbacks=self._callbacks).history
        out = {"loss": float(history["loss"][-1])}
        acc = next((k for k in ("accuracy", "binary_accuracy", "sparse_categorical_accuracy") if k in history), None)
        if acc is not None:  # a model compiled without an accuracy metric reports loss only
            out["accuracy"] = float(history[acc][-1])
        return out

    def weights(self) -> list[np.ndarray]:
        return [np.asarray(w) for w in self.model.get_weights()]

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """eval_* metrics of the loaded model on standardised held-out rows (x: (n, features))."""
        return client_metrics(predict_proba(self.model, x, self.num_classes), y)


def _attach_proximal(model: Any, mu: float) -> list[Any]:
    """Add mu/2 ||w - anchor||^2 to every trainable variable's regularizer; returns the anchors."""
    import keras

    class Proximal(keras.regularizers.Regularizer):
        def __init__(self, anchor: Any, inner: Any) -> None:
            self.anchor = anchor
            self.inner = inner  # a model of your own may regularize its weights already

        def __call__(self, w: Any) -> Any:
            term = (mu / 2.0) * keras.ops.sum(keras.ops.square(w - self.anchor))
            return term if self.inner is None else term + self.inner(w)

    anchors = []
    for var in model.trainable_variables:
        anchor = keras.Variable(np.array(var.numpy()), trainable=False, dtype=var.dtype)
        var.regularizer = Proximal(anchor, var.regularizer)
        anchors.append(anchor)
    return anchors


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
