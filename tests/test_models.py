"""Bring-your-own models (builder function, .keras file), binary and multi-class, FedProx, stable names."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedq.errors import ConfigError
from fedq.learning.dataspec import DataSpec
from fedq.learning.models import build_model, check_model_arg, evaluate, resolve_model_arg, weight_names
from fedq.learning.spec import RunSpec
from fedq.learning.strategies import StrategySpec
from fedq.learning.trainer import KerasTrainer
from fedq.roles.simulation import Federation


def _trainer(spec: RunSpec, x: np.ndarray, y: np.ndarray, classes: int = 2) -> KerasTrainer:
    return KerasTrainer(spec, x.shape[1], classes, x, y, 0, threading.Event())


def _toy(n: int = 120, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)


@pytest.mark.slow
def test_weight_names_do_not_depend_on_what_the_process_built_before() -> None:
    first = weight_names(build_model("seed", 17, 2, 0))
    build_model("byo_models:build_mlp", 17, 2, 0)
    assert weight_names(build_model("seed", 17, 2, 0)) == first
    assert weight_names(build_model("byo_models:build_mlp", 9, 3, 0)) == weight_names(
        build_model("byo_models:build_mlp", 9, 3, 0))
    assert len(set(first)) == len(first)


@pytest.mark.slow
def test_builder_model_is_seeded_trains_and_reports_binary_metrics() -> None:
    a = build_model("byo_models:build_mlp", 6, 2, 3)
    b = build_model("byo_models:build_mlp", 6, 2, 3)
    assert all(np.array_equal(p, q) for p, q in zip(a.get_weights(), b.get_weights()))
    assert a.input_shape == (None, 6)
    x, y = _toy()
    spec = RunSpec(model="byo_models:build_mlp", local_epochs=5).validate()
    t = _trainer(spec, x, y)
    t.load(a.get_weights())
    before = t.evaluate(x, y)
    m = t.train(1)
    after = t.evaluate(x, y)
    assert set(m) == {"loss", "accuracy"} and after["eval_accuracy"] > before["eval_accuracy"]
    assert after["eval_examples"] == len(y)
    assert sum(after[k] for k in ("eval_tp", "eval_fp", "eval_fn", "eval_tn")) == len(y)
    ev = evaluate(t.model, x, y)
    assert {"auc", "precision", "recall", "f1"} <= set(ev) and 0.5 < ev["auc"] <= 1


@pytest.mark.slow
def test_sigmoid_and_uncompiled_models() -> None:
    x, y = _toy(seed=1)
    sig = _trainer(RunSpec(model="byo_models:build_sigmoid", local_epochs=20).validate(), x, y)
    sig.train(1)
    ev = evaluate(sig.model, x, y, 2)
    assert ev["accuracy"] > 0.8 and ev["auc"] > 0.9
    unc = _trainer(RunSpec(model="byo_models:build_uncompiled", optimizer="sgd").validate(), x, y)
    assert type(unc.model.optimizer).__name__ == "SGD"  # the run's optimizer compiled it


@pytest.mark.slow
def test_keras_file_supplies_architecture_and_initial_weights(tmp_path: Path) -> None:
    src = build_model("byo_models:build_mlp", 6, 2, 11)
    path = tmp_path / "mine.keras"
    src.save(path)
    loaded = build_model(str(path), 6, 2, 0)
    assert all(np.array_equal(p, q) for p, q in zip(loaded.get_weights(), src.get_weights()))
    assert resolve_model_arg("rel/dir/m.keras").endswith("rel/dir/m.keras") and resolve_model_arg("seed") == "seed"
    x, y = _toy()
    t = _trainer(RunSpec(model=str(path)).validate(), x, y)
    t.train(1)


@pytest.mark.parametrize("name, message", [
    ("no_such_module_xyz:build", "cannot import model module"),
    ("byo_models:missing", "has no function"),
    ("byo_models:build_wrong_output", "outputs 5 value"),
    ("byo_models:build_broken", "failed: RuntimeError: no model today"),
    ("not a model", "unknown model"),
])
def test_bad_models_are_one_clear_error(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(name, 6, 2, 0)


def test_missing_model_file_and_wrong_input_shape(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model file not found"):
        check_model_arg(str(tmp_path / "absent.keras"))
    with pytest.raises(ConfigError, match="model file not found"):
        RunSpec(model=str(tmp_path / "absent.keras")).validate()
    path = tmp_path / "six.keras"
    build_model("byo_models:build_mlp", 6, 2, 0).save(path)
    with pytest.raises(ConfigError, match="takes input shape"):
        build_model(str(path), 9, 2, 0)


@pytest.mark.slow
def test_fedprox_keeps_local_training_near_the_global_model() -> None:
    x, y = _toy(200, seed=2)
    drift = {}
    for mu in (0.0, 5.0):
        spec = RunSpec(model="byo_models:build_mlp", local_epochs=10,
                       strategy=StrategySpec(name="fedprox", mu=mu)).validate()
        t = _trainer(spec, x, y)
        start = [np.array(w) for w in t.weights()]
        t.load(start)
        t.train(1)
        drift[mu] = np.sqrt(sum(np.sum((w - s) ** 2) for w, s in zip(t.weights(), start)))
        t.load(start)  # the anchor follows each round's global model
        assert all(np.array_equal(a.numpy(), s) for a, s in zip(t._anchors, start))
    assert drift[5.0] < 0.5 * drift[0.0], drift


@pytest.mark.slow
def test_multiclass_federation_with_a_model_of_your_own(tmp_path: Path) -> None:
    from sklearn.datasets import load_wine

    wine = load_wine(as_frame=True)
    csv = tmp_path / "wine.csv"
    wine.frame.rename(columns={"target": "kind"}).to_csv(csv, index=False)
    assert pd.read_csv(csv)["kind"].nunique() == 3
    data = DataSpec(source="csv", csv=str(csv), label_column="kind", val_fraction=0.2)
    spec = RunSpec(clients=3, rounds=4, local_epochs=5, model="byo_models:build_mlp", data=data).validate()
    fed = Federation.build(spec)
    assert fed.num_classes == 3
    records = fed.run()
    assert records[-1]["test_accuracy"] > 0.85, records
    assert "test_auc" not in records[-1]  # binary-only metrics
    assert records[-2]["fed_eval_accuracy"] > 0.7 and records[-2]["fed_eval_examples"] > 0
    spec2 = dataclasses.replace(spec, strategy=StrategySpec(name="fedmedian"))
    assert fed.run(spec2, rounds=2)[-1]["test_accuracy"] > 0.6
