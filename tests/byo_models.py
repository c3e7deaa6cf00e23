"""Models of "your own" for the tests: --model byo_models:<function> (tests/ must be importable)."""

from __future__ import annotations

from typing import Any


def build_mlp(input_shape: tuple[int, ...], num_classes: int) -> Any:
    """A small softmax MLP, compiled with its own optimizer."""
    import keras

    model = keras.Sequential([keras.Input(shape=input_shape), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(num_classes, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def build_sigmoid(input_shape: tuple[int, ...], num_classes: int) -> Any:
    """Logistic regression with one sigmoid output (binary tasks)."""
    import keras

    model = keras.Sequential([keras.Input(shape=input_shape), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy", metrics=["accuracy"])
    return model


def build_uncompiled(input_shape: tuple[int, ...], num_classes: int) -> Any:
    """Left uncompiled: fedq compiles it with the run's optimizer."""
    import keras

    return keras.Sequential([keras.Input(shape=input_shape), keras.layers.Dense(num_classes, activation="softmax")])


def build_wrong_output(input_shape: tuple[int, ...], num_classes: int) -> Any:
    import keras

    return keras.Sequential([keras.Input(shape=input_shape), keras.layers.Dense(num_classes + 3)])


def build_broken(input_shape: tuple[int, ...], num_classes: int) -> Any:
    raise RuntimeError("no model today")


def build_wide(input_shape: tuple[int, ...], num_classes: int) -> Any:
    """A wide MLP of about 300k parameters (1.2 MB of float32): big enough that the bytes the
    aggregator reads are dominated by updates, small enough to build in a blink."""
    import keras

    model = keras.Sequential([keras.Input(shape=input_shape), keras.layers.Dense(1024, activation="relu"),
                              keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(num_classes, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def build_marking_exit(input_shape: tuple[int, ...], num_classes: int) -> Any:
    """build_uncompiled, and an exit hook that writes the file named by FEDQ_TEST_EXIT_MARK: a
    process that runs its interpreter's teardown (atexit hooks among it) leaves that file."""
    import atexit
    import os
    from pathlib import Path

    mark = Path(os.environ["FEDQ_TEST_EXIT_MARK"])
    atexit.register(mark.write_text, "teardown ran")
    return build_uncompiled(input_shape, num_classes)
