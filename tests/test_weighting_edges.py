"""Edges of the weighting math (fedq.learning.aggregate) that mutation testing found unguarded:
zero counts, tensors longer than one fold block, a model folded in parts against the same model
folded whole, a metric reported by one sample, and the errors' wording. References are float64
sums written here, not fedq's own code."""

from __future__ import annotations

import numpy as np
import pytest

from fedq.learning.aggregate import BLOCK, FedAvg, capped_weights, fedavg, weighted_metrics


def _models(rng: np.random.Generator, sizes: tuple[int, ...]) -> list[np.ndarray]:
    return [rng.normal(size=n).astype(np.float32) for n in sizes]


def _reference(models: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    total = sum(n for _, n in models)
    return [sum(m[i].astype(np.float64) * n for m, n in models) / total for i in range(len(models[0][0]))]


def test_a_zero_or_negative_count_is_refused_whole_or_in_parts() -> None:
    acc = FedAvg([np.zeros(3, np.float32)])
    for n in (0, -1):
        with pytest.raises(ValueError, match=f"num_examples must be positive, got {n}"):
            acc.add([np.ones(3, np.float32)], n)
        with pytest.raises(ValueError, match=f"num_examples must be positive, got {n}"):
            acc.count_model(n)
    assert (acc.total_examples, acc.count) == (0, 0)
    with pytest.raises(ValueError, match=r"^no updates were aggregated$"):
        acc.result()


def test_a_tensor_of_another_shape_is_named_in_the_error() -> None:
    acc = FedAvg([np.zeros((2, 3), np.float32)])
    with pytest.raises(ValueError, match=r"tensor of shape \(3, 2\) where the model has \(2, 3\)"):
        acc.add([np.zeros((3, 2), np.float32)], 1)


def test_tensors_longer_than_a_fold_block_are_weighted_throughout() -> None:
    rng = np.random.default_rng(0)
    sizes = (2 * BLOCK + 3, 5)
    models = [(_models(rng, sizes), 3), (_models(rng, sizes), 1)]
    got = fedavg(models)
    for g, want in zip(got, _reference(models), strict=True):
        np.testing.assert_allclose(g, want.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_a_model_folded_in_parts_equals_it_folded_whole() -> None:
    rng = np.random.default_rng(1)
    sizes = (BLOCK + 7, 4, 9)
    models = [(_models(rng, sizes), 5), (_models(rng, sizes), 2)]
    whole, parts = FedAvg(models[0][0]), FedAvg(models[0][0])
    for tensors, n in models:
        whole.add(tensors, n)
        flat = np.concatenate([t.reshape(-1) for t in tensors])
        for lo in range(0, flat.size, 1000):  # parts that straddle tensor boundaries
            parts.add_part(lo, flat[lo:lo + 1000], n)
        parts.count_model(n)
    expected = np.concatenate([t.reshape(-1) for t in whole.result()])
    np.testing.assert_array_equal(parts.result_slice(0, expected.size), expected)
    np.testing.assert_array_equal(parts.result_slice(BLOCK, 20), expected[BLOCK:BLOCK + 20])
    for offset in (-1, expected.size - 3):
        with pytest.raises(ValueError, match="outside the model's"):
            parts.add_part(offset, np.zeros(4, np.float32), 1)
        with pytest.raises(ValueError, match="outside the model's"):
            parts.result_slice(offset, 4)


def test_a_metric_reported_by_one_sample_is_kept() -> None:
    assert weighted_metrics([({"loss": 0.5}, 1)]) == {"loss": 0.5}
    assert weighted_metrics([({"loss": 0.5}, 1), ({"loss": 2.0, "accuracy": 1.0}, 3)]) == {
        "loss": 1.625, "accuracy": 1.0}


def test_the_errors_say_what_was_wrong() -> None:
    with pytest.raises(ValueError, match=r"^no models to aggregate$"):
        fedavg([])
    with pytest.raises(ValueError, match=r"^counts must be positive$"):
        capped_weights({"a": 0}, 0.5)


def test_a_model_carrying_exactly_the_share_keeps_its_count() -> None:
    counts = {"a": 7, "b": 8, "c": 7, "d": 2}  # b is exactly a third of 24
    assert capped_weights(counts, 1 / 3) == counts
    assert capped_weights({"a": 2, "b": 1, "c": 1}, 0.5) == {"a": 2, "b": 1, "c": 1}
    assert capped_weights({"a": 3, "b": 1}, 0.5) == {"a": 1, "b": 1}  # no weighting meets 0.5 but equal ones


def test_slices_of_the_mean_check_their_bounds_and_dtypes() -> None:
    acc = FedAvg([np.zeros(2, np.float32), np.zeros(2, np.float32)])
    acc.add([np.arange(2, dtype=np.float32), np.arange(2, 4, dtype=np.float32)], 2)
    assert acc.result_slice(1, 0).size == 0
    np.testing.assert_array_equal(acc.result_slice(1, 2), np.array([1, 2], np.float32))
    with pytest.raises(ValueError, match=r"^slice \[3, 5\) outside the model's 4 parameters$"):
        acc.result_slice(3, 2)
    with pytest.raises(ValueError, match=r"^part \[2, 6\) outside the model's 4 parameters$"):
        acc.add_part(2, np.zeros(4, np.float32), 1)
    mixed = FedAvg([np.zeros(2, np.float32), np.zeros(2, np.float64)])
    mixed.add([np.ones(2, np.float32), np.ones(2, np.float64)], 1)
    with pytest.raises(ValueError, match=r"^result_slice needs tensors of one dtype$"):
        mixed.result_slice(0, 2)
