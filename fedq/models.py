"""Models: the seed's network by default. TensorFlow is imported lazily so that the CLI,
the rq worker parent and the tests of pure modules start fast."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from fedq.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import keras

MODELS = ("seed",)


def _keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ banner out of user output
    # oneDNN's reordered float sums make runs irreproducible and print a banner; the seed's
    # small network gains nothing from it.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import keras  # noqa: WPS433 (lazy on purpose)

    return keras


def build_model(name: str, num_features: int, num_classes: int, seed: int) -> "keras.Model":
    """An uncompiled model; the same (name, shape, seed) gives the same initial weights."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    if name == "seed":
        return _seed_network(keras, num_features, num_classes)
    raise ConfigError(f"unknown model {name!r}; available: {', '.join(MODELS)}")


def _seed_network(keras: Any, num_features: int, num_classes: int) -> "keras.Model":
    """The Kubeflow example's network, with the input width taken from the data."""
    # Conv1D(kernel 3) then MaxPooling1D(3) needs at least 5 positions to leave one output.
    if num_features < 5:
        raise ConfigError(f"the seed network needs at least 5 features, the data has {num_features}")
    layers = keras.layers
    return keras.Sequential([
        keras.Input(shape=(num_features, 1)),
        layers.Conv1D(filters=4, kernel_size=3),
        layers.MaxPooling1D(3),
        layers.Flatten(),
        layers.Dense(8, activation="relu"),
        layers.Dense(num_classes, activation="softmax"),
    ], name="seed_cnn")


def compile_model(model: "keras.Model", optimizer: str, learning_rate: float) -> "keras.Model":
    """Compile for integer class labels (the seed's one-hot labels, without the one-hot)."""
    keras = _keras()
    classes = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD,
               "rmsprop": keras.optimizers.RMSprop, "adagrad": keras.optimizers.Adagrad}
    if optimizer not in classes:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(classes)}")
    model.compile(optimizer=classes[optimizer](learning_rate=learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def weight_names(model: "keras.Model") -> list[str]:
    """Stable names of the model's weights, in get_weights() order."""
    return [getattr(w, "path", None) or w.name for w in model.weights]


def to_model_input(x: np.ndarray) -> np.ndarray:
    """(n, d) features to the (n, d, 1) float32 layout the Conv1D network expects."""
    return np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1, 1)


def evaluate(model: "keras.Model", x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Loss and accuracy of a model on (x, y), computed with numpy from one forward pass."""
    if len(x) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    probs = np.asarray(model(to_model_input(x), training=False), dtype=np.float64)
    picked = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    return {"loss": float(-np.log(picked).mean()),
            "accuracy": float((probs.argmax(axis=1) == y).mean())}
