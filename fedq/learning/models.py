"""Models: the seed's network by default, or your own. TensorFlow is imported lazily so that
the CLI, the rq worker parent and the tests of pure modules start fast.

``--model`` takes one of:

- ``seed``: the Kubeflow example's Conv1D network (input ``(features, 1)``, softmax output);
  it needs at least 5 features;
- ``mlp``: a small dense network (input ``(features,)``, one hidden layer of 16 ReLU units,
  softmax output) for data of any width, e.g. iris's 4 features;
- ``package.module:build_fn``: ``build_fn(input_shape, num_classes)`` returns a compiled Keras
  model; ``input_shape`` is ``(features,)``. The module must be importable on the aggregator and
  on every client (installed, on ``PYTHONPATH``, or in the working directory);
- ``path/model.keras``: a saved model; its architecture is trained and its weights are the
  initial global model. The file must exist at that path on the aggregator and every client.

A model's output is either one softmax unit per class or, for two classes, one sigmoid unit.
A compiled model keeps its own optimizer and loss; an uncompiled one is compiled with the
run's ``--optimizer`` and ``--learning-rate``.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from fedq.errors import ConfigError
from fedq.learning.evaluation import classification_metrics, to_probabilities

if TYPE_CHECKING:  # pragma: no cover
    import keras

MODELS = ("seed", "mlp")  # built in
SEED_MIN_FEATURES = 5  # Conv1D(kernel 3) then MaxPooling1D(3) needs 5 positions to leave one output
_BUILDER = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def model_kind(name: str) -> str:
    """'seed' or 'mlp' (built in), 'builder' (module:function) or 'file' (a .keras path);
    ConfigError otherwise."""
    if name in MODELS:
        return name
    if isinstance(name, str) and name.endswith(".keras"):
        return "file"
    if isinstance(name, str) and _BUILDER.match(name):
        return "builder"
    raise ConfigError(f"unknown model {name!r}: use 'seed', 'mlp', 'package.module:build_fn' or a path to a "
                      ".keras file")


def check_model_arg(name: str) -> str:
    """ConfigError unless name is a usable --model value (a .keras file must exist); returns it."""
    if model_kind(name) == "file" and not os.path.isfile(name):
        raise ConfigError(f"model file not found: {name}")
    return name


def resolve_model_arg(name: str) -> str:
    """The --model value as stored in a run spec: a .keras path made absolute."""
    return os.path.abspath(name) if model_kind(name) == "file" else name


def _keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ banner out of user output
    # oneDNN's reordered float sums make runs irreproducible and print a banner; the seed's
    # small network gains nothing from it.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import keras  # lazy on purpose: importing TensorFlow takes seconds

    return keras


def keras_installed() -> bool:
    """Whether Keras (TensorFlow) can be imported here; slim installs have neither."""
    import importlib.util

    try:
        return importlib.util.find_spec("keras") is not None
    except (ImportError, ValueError):
        return False


def build_model(name: str, num_features: int, num_classes: int, seed: int) -> keras.Model:
    """The run's model; the same (name, shape, seed) gives the same initial weights.

    The seed network comes back uncompiled; a model of your own as its builder or file made it."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    kind = model_kind(name)
    if kind == "seed":
        return _seed_network(keras, num_features, num_classes)
    if kind == "mlp":
        return _mlp(keras, num_features, num_classes)
    if kind == "file":
        check_model_arg(name)
        try:
            with warnings.catch_warnings():
                # Saved optimizer state is of no use: local training starts afresh every round.
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model = keras.models.load_model(name, compile=True)
        except Exception as exc:  # Keras raises many types for a bad file; all mean the same here
            raise ConfigError(f"cannot load model {name}: {type(exc).__name__}: {exc}") from None
    else:
        fn = import_builder(name)
        try:
            model = fn((num_features,), num_classes)
        except Exception as exc:  # the user's code: report it as one clear line
            raise ConfigError(f"model builder {name} failed: {type(exc).__name__}: {exc}") from None
    _check_io(model, name, num_features, num_classes)
    return model


def import_builder(name: str) -> Any:
    """The build function a 'package.module:build_fn' model names; ConfigError if it cannot be had."""
    module_name, _, fn_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as first:
        # The console script's sys.path lacks the working directory, where users keep such files.
        if os.getcwd() in sys.path or first.name != module_name.split(".")[0]:
            raise ConfigError(f"cannot import model module {module_name!r}: {first}") from None
        sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import model module {module_name!r}: {exc}") from None
    except ImportError as exc:
        raise ConfigError(f"cannot import model module {module_name!r}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"model module {module_name!r} has no function {fn_name!r}")
    return fn


def _check_io(model: Any, name: str, num_features: int, num_classes: int) -> None:
    """ConfigError unless the model takes num_features values per row and outputs the classes."""
    if not hasattr(model, "get_weights") or not hasattr(model, "input_shape"):
        raise ConfigError(f"model {name} is not a Keras model (got {type(model).__name__})")
    shape = model.input_shape
    if isinstance(shape, list):
        raise ConfigError(f"model {name} has {len(shape)} inputs; fedq feeds one")
    dims = [d for d in shape[1:]]
    if None not in dims and math.prod(dims) != num_features:
        raise ConfigError(f"model {name} takes input shape {tuple(shape[1:])}, the data has {num_features} features")
    out = model.output_shape
    units = out[-1] if isinstance(out, tuple) else None
    if units not in (num_classes, 1 if num_classes == 2 else num_classes):
        raise ConfigError(f"model {name} outputs {units} value(s) per row; the data has {num_classes} classes "
                          f"(use {num_classes} softmax units{' or 1 sigmoid unit' if num_classes == 2 else ''})")


def check_seed_width(num_features: int) -> None:
    """ConfigError, with the way forward, when the seed network cannot take data this narrow."""
    if num_features < SEED_MIN_FEATURES:
        raise ConfigError(f"the seed network needs at least {SEED_MIN_FEATURES} features, the data has "
                          f"{num_features}: use --model mlp (a small dense network for any number of features)")


def check_model(name: str, num_features: int, num_classes: int) -> None:
    """Import and build the model on the data's shape, here and now: ConfigError naming what is
    wrong, before any process starts. The seed and mlp networks are checked without TensorFlow."""
    kind = model_kind(name)
    if kind == "seed":
        check_seed_width(num_features)
    elif kind != "mlp":
        build_model(name, num_features, num_classes, seed=0)


def _seed_network(keras: Any, num_features: int, num_classes: int) -> keras.Model:
    """The Kubeflow example's network, with the input width taken from the data."""
    check_seed_width(num_features)
    layers = keras.layers
    return keras.Sequential([
        keras.Input(shape=(num_features, 1)),
        layers.Conv1D(filters=4, kernel_size=3),
        layers.MaxPooling1D(3),
        layers.Flatten(),
        layers.Dense(8, activation="relu"),
        layers.Dense(num_classes, activation="softmax"),
    ], name="seed_cnn")


def _mlp(keras: Any, num_features: int, num_classes: int) -> keras.Model:
    """A small dense network for tabular data of any width (the seed network needs 5 features)."""
    layers = keras.layers
    return keras.Sequential([
        keras.Input(shape=(num_features,)),
        layers.Dense(16, activation="relu"),
        layers.Dense(num_classes, activation="softmax"),
    ], name="mlp")


def compile_model(model: keras.Model, optimizer: str, learning_rate: float) -> keras.Model:
    """Compile for integer class labels (the seed's one-hot labels, without the one-hot)."""
    keras = _keras()
    classes = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD,
               "rmsprop": keras.optimizers.RMSprop, "adagrad": keras.optimizers.Adagrad}
    if optimizer not in classes:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(classes)}")
    sigmoid = model.output_shape[-1] == 1
    model.compile(optimizer=classes[optimizer](learning_rate=learning_rate),
                  loss="binary_crossentropy" if sigmoid else "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def ensure_compiled(model: keras.Model, optimizer: str, learning_rate: float) -> keras.Model:
    """Keep a model's own compilation; compile an uncompiled one with the run's optimizer."""
    if getattr(model, "compiled", False) and getattr(model, "optimizer", None) is not None:
        return model
    return compile_model(model, optimizer, learning_rate)


def keras_file(model: keras.Model, optimizer: str, learning_rate: float) -> bytes:
    """The model as the bytes of a .keras file, compiled (with the run's optimizer, when it was
    not) and with its optimizer built, so that the file loads ready to predict or train."""
    import tempfile

    ensure_compiled(model, optimizer, learning_rate)
    if not getattr(model.optimizer, "built", False):
        model.optimizer.build(model.trainable_variables)  # so the file loads without optimizer warnings
    with tempfile.TemporaryDirectory(prefix="fedq-model-") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        with open(path, "rb") as f:
            return f.read()


def weight_names(model: keras.Model) -> list[str]:
    """Stable names of the model's weights, in get_weights() order.

    Keras numbers auto-named layers per process (dense, dense_1, ...), so the same architecture
    built twice, or in two processes that built other models before, names its weights
    differently. A position prefix with the numbering stripped is the same everywhere."""
    return [f"{i:03d}:" + re.sub(r"_\d+(?=/|$)", "", getattr(w, "path", None) or w.name)
            for i, w in enumerate(model.weights)]


def model_input(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """(n, d) features in the layout the model takes: (n, d, 1) for the seed network, (n, d) for most."""
    dims = list(model.input_shape[1:])
    x = np.ascontiguousarray(x, dtype=np.float32)
    if None in dims or not dims:
        return x
    return x.reshape(len(x), *dims)


def predict_proba(model: keras.Model, x: np.ndarray, num_classes: int, batch: int = 8192) -> np.ndarray:
    """(n, C) class probabilities of the model on standardised rows x."""
    parts = [np.asarray(model(model_input(model, x[i:i + batch]), training=False))
             for i in range(0, len(x), batch)]
    raw = np.concatenate(parts) if parts else np.zeros((0, num_classes))
    return to_probabilities(raw, num_classes)


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, num_classes: int | None = None) -> dict[str, Any]:
    """Loss and accuracy of a model on (x, y), and for binary tasks auc, precision, recall and f1."""
    if len(x) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    if num_classes is None:
        units = model.output_shape[-1]
        num_classes = 2 if units == 1 else units
    return classification_metrics(predict_proba(model, x, num_classes), y)
