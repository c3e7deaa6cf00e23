"""fedq.learning.evaluation: central metrics against scikit-learn, federated combination, message checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, log_loss, precision_score, recall_score, roc_auc_score

from fedq.errors import UpdateRejected
from fedq.learning import evaluation


def _probs(n: int, seed: int, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = rng.random((n, classes))
    y = rng.integers(0, classes, n)
    return raw / raw.sum(axis=1, keepdims=True), y


def test_binary_metrics_are_scikit_learns() -> None:
    p, y = _probs(200, 1)
    m = evaluation.classification_metrics(p, y)
    pred = p.argmax(axis=1)
    assert m["loss"] == pytest.approx(log_loss(y, p), rel=1e-9)
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert evaluation.classification_metrics(p[y == 1], y[y == 1])["auc"] is None  # one class: undefined
    multi = evaluation.classification_metrics(*_probs(50, 2, classes=3))
    assert set(multi) == {"loss", "accuracy"}


def test_sigmoid_output_becomes_two_columns() -> None:
    p = evaluation.to_probabilities(np.array([[0.2], [0.9]]), 2)
    np.testing.assert_allclose(p, [[0.8, 0.2], [0.1, 0.9]])
    with pytest.raises(ValueError, match="outputs 4 values"):
        evaluation.to_probabilities(np.zeros((3, 4)), 3)


def test_federated_combination_equals_the_pooled_rows() -> None:
    parts = [_probs(n, s) for n, s in ((30, 3), (70, 4), (5, 5))]
    combined = evaluation.combine(evaluation.client_metrics(p, y) for p, y in parts)
    pooled = evaluation.classification_metrics(np.concatenate([p for p, _ in parts]),
                                               np.concatenate([y for _, y in parts]))
    assert combined["fed_eval_examples"] == 105
    for k in ("loss", "accuracy", "precision", "recall", "f1"):
        assert combined[f"fed_eval_{k}"] == pytest.approx(pooled[k], rel=1e-9), k
    assert evaluation.combine([]) == {} and evaluation.combine([{"loss": 1.0}]) == {}


def test_evaluation_messages_are_checked() -> None:
    ok = evaluation.client_metrics(*_probs(10, 6))
    raw = evaluation.encode_eval("run", 3, "c1", ok)
    assert evaluation.validate_eval(raw, run_id="run", round_no=3, client_id="c1", max_examples=10) == ok
    cases = [
        (b"\xff", "undecodable"),
        (b"[1, 2]", "undecodable"),
        (evaluation.encode_eval("run", 2, "c1", ok), "wrong_round"),
        (evaluation.encode_eval("run", 3, "c2", ok), "wrong_round"),
        (evaluation.encode_eval("run", 3, "c1", {"eval_loss": 1.0}), "bad_metrics"),
        (evaluation.encode_eval("run", 3, "c1", {**ok, "eval_examples": 11.0}), "bad_num_examples"),
        (evaluation.encode_eval("run", 3, "c1", {**ok, "eval_accuracy": 1.5}), "bad_metrics"),
        (evaluation.encode_eval("run", 3, "c1", {**ok, "eval_tp": ok["eval_tp"] + 1}), "bad_metrics"),
        (json.dumps({"run": "run", "round": 3, "client": "c1",
                     "metrics": {**ok, "eval_loss": float("nan")}}).encode(), "bad_metrics"),
        (b"x" * 5000, "too_large"),
    ]
    for payload, reason in cases:
        with pytest.raises(UpdateRejected) as exc:
            evaluation.validate_eval(payload, run_id="run", round_no=3, client_id="c1", max_examples=10)
        assert exc.value.reason == reason, (payload[:60], exc.value)
