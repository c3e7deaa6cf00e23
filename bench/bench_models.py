"""Models of a chosen size for benchmarks (``--model bench.bench_models:dense_1m``)."""

from __future__ import annotations

from typing import Any


def _dense(input_shape: tuple[int, ...], num_classes: int, params: int) -> Any:
    import keras

    # features -> hidden -> classes has about (features + 1 + classes) * hidden parameters.
    hidden = max(1, params // (input_shape[0] + 1 + num_classes))
    model = keras.Sequential([keras.Input(shape=input_shape), keras.layers.Dense(hidden, activation="relu"),
                              keras.layers.Dense(num_classes, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def dense_1m(input_shape: tuple[int, ...], num_classes: int) -> Any:
    """About one million float32 parameters."""
    return _dense(input_shape, num_classes, 1_000_000)


def dense_25m(input_shape: tuple[int, ...], num_classes: int) -> Any:
    """About 25 million float32 parameters (100 MB)."""
    return _dense(input_shape, num_classes, 25_000_000)


def dense_250m(input_shape: tuple[int, ...], num_classes: int) -> Any:
    """About 250 million float32 parameters (1 GB): the largest model the benchmarks federate."""
    return _dense(input_shape, num_classes, 250_000_000)
