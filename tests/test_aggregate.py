"""Tests for fedq.learning.aggregate: streaming FedAvg against a float64 numpy reference, and metric averaging."""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Sequence

import numpy as np
import pytest

from fedq.learning.aggregate import FedAvg, fedavg, weighted_metrics

TOL = 1e-6

# Several tensors: a 0-d tensor, a zero-size tensor and odd shapes next to ordinary ones.
SHAPES: list[tuple[int, ...]] = [(), (0,), (3, 0, 2), (7,), (5, 3), (2, 3, 5), (1, 1, 1, 4), (13, 1)]

F32 = np.dtype(np.float32)


def _models(rng: np.random.Generator, n_models: int, dtype: np.dtype = F32,
            shapes: Sequence[tuple[int, ...]] = SHAPES) -> list[list[np.ndarray]]:
    """Random models of the given dtype; tensors have different scales so relative error matters."""
    models = []
    for _ in range(n_models):
        tensors = []
        for k, shape in enumerate(shapes):
            scale = 10.0 ** (k % 4 - 1)  # 0.1 .. 100
            tensors.append((rng.standard_normal(shape) * scale).astype(dtype))
        models.append(tensors)
    return models


def _counts(rng: np.random.Generator, n_models: int) -> list[int]:
    """Sample counts, very unequal ones (1 and 10**6) included whenever there are two or more clients."""
    counts = [int(c) for c in rng.integers(1, 5000, size=n_models)]
    if n_models >= 2:
        counts[0] = 1
        counts[-1] = 10**6
    return counts


def _reference(models: Sequence[Sequence[np.ndarray]], counts: Sequence[int]) -> list[np.ndarray]:
    """sum(n_i * w_i) / sum(n_i), all in float64."""
    total = float(sum(counts))
    out = []
    for k in range(len(models[0])):
        acc = np.zeros(models[0][k].shape, dtype=np.float64)
        for tensors, n in zip(models, counts):
            acc += float(n) * tensors[k].astype(np.float64)
        out.append(acc / total)
    return out


def _assert_close(result: Sequence[np.ndarray], ref: Sequence[np.ndarray], template: Sequence[np.ndarray]) -> None:
    assert len(result) == len(ref)
    for k, (got, want, t) in enumerate(zip(result, ref, template)):
        assert np.dtype(got.dtype) == np.dtype(t.dtype), f"tensor {k}: dtype {got.dtype}, template {t.dtype}"
        assert np.shape(got) == t.shape, f"tensor {k}: shape {np.shape(got)}, template {t.shape}"
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=TOL, atol=TOL,
                                   err_msg=f"tensor {k} (shape {t.shape})")


def _fold(models: Sequence[Sequence[np.ndarray]], counts: Sequence[int]) -> list[np.ndarray]:
    acc = FedAvg(models[0])
    for tensors, n in zip(models, counts):
        acc.add(tensors, n)
    assert acc.count == len(models)
    assert acc.total_examples == sum(counts)
    return acc.result()


# ---------------------------------------------------------------- correctness against the reference


@pytest.mark.parametrize("n_clients", [1, 2, 7, 50])
def test_fedavg_matches_float64_reference(n_clients: int) -> None:
    rng = np.random.default_rng(1000 + n_clients)
    models = _models(rng, n_clients)
    counts = _counts(rng, n_clients)
    _assert_close(_fold(models, counts), _reference(models, counts), models[0])


def test_single_client_gives_its_own_model() -> None:
    rng = np.random.default_rng(3)
    (model,) = _models(rng, 1)
    for n in (1, 17, 10**6):
        _assert_close(_fold([model], [n]), [t.astype(np.float64) for t in model], model)


def test_dominant_client_pulls_the_mean_towards_it() -> None:
    """With counts 1 and 10**6 the result is almost exactly the big client's model, not the midpoint."""
    small = [np.zeros((4,), np.float32)]
    big = [np.ones((4,), np.float32)]
    (out,) = _fold([small, big], [1, 10**6])
    np.testing.assert_allclose(out, 10**6 / (10**6 + 1), rtol=TOL, atol=TOL)
    assert out.min() > 0.99


@pytest.mark.parametrize("n_clients", [1, 2, 7, 50])
def test_float64_template_stays_float64(n_clients: int) -> None:
    rng = np.random.default_rng(2000 + n_clients)
    models = _models(rng, n_clients, np.dtype(np.float64))
    counts = _counts(rng, n_clients)
    result = _fold(models, counts)
    assert all(np.dtype(t.dtype) == np.float64 for t in result)
    _assert_close(result, _reference(models, counts), models[0])


@pytest.mark.parametrize("n_clients", [1, 2, 7, 50])
def test_float16_template_stays_float16_and_is_correctly_rounded(n_clients: int) -> None:
    rng = np.random.default_rng(3000 + n_clients)
    models = _models(rng, n_clients, np.dtype(np.float16))
    counts = _counts(rng, n_clients)
    result = _fold(models, counts)
    ref = _reference(models, counts)
    for k, (got, want, t) in enumerate(zip(result, ref, models[0])):
        assert np.dtype(got.dtype) == np.float16, f"tensor {k}: dtype {got.dtype}"
        assert np.shape(got) == t.shape
        # float16 itself only has ~3 digits: the result must be the reference rounded to float16
        # (within one float16 ulp, which allows either neighbour at a rounding tie).
        ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
        err = np.abs(np.asarray(got, dtype=np.float64) - want)
        assert np.all(err <= ulp), f"tensor {k}: error {err.max() if err.size else 0} above one float16 ulp"


def test_float32_template_stays_float32_with_mixed_dtypes() -> None:
    """Each tensor keeps its own template dtype, even when a model mixes dtypes."""
    rng = np.random.default_rng(4)
    dtypes = [np.float32, np.float64, np.float16, np.float32]
    shapes = [(3,), (2, 2), (5,), ()]

    def model() -> list[np.ndarray]:
        return [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]

    models = [model() for _ in range(5)]
    counts = [3, 1, 10**6, 40, 7]
    result = _fold(models, counts)
    assert [np.dtype(t.dtype) for t in result] == [np.dtype(d) for d in dtypes]
    ref = _reference(models, counts)
    for got, want, d in zip(result, ref, dtypes):
        tol = TOL if d != np.float16 else 1e-3
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=tol, atol=tol)


def test_result_tensors_are_arrays_of_the_template_shape() -> None:
    """result() promises list[np.ndarray]: a 0-d tensor must come back as a 0-d array, not a numpy scalar."""
    template = [np.array(2.5, dtype=np.float32), np.zeros((0,), np.float32), np.ones((2, 3), np.float32)]
    acc = FedAvg(template)
    acc.add(template, 4)
    result = acc.result()
    for got, t in zip(result, template):
        assert isinstance(got, np.ndarray), f"got {type(got).__name__} for a template of shape {t.shape}"
        assert got.shape == t.shape
        assert got.dtype == t.dtype
    assert float(result[0]) == 2.5


# ---------------------------------------------------------------- order independence and precision


@pytest.mark.parametrize("n_clients", [2, 7, 50])
def test_order_of_folding_does_not_matter(n_clients: int) -> None:
    rng = np.random.default_rng(5000 + n_clients)
    models = _models(rng, n_clients)
    counts = _counts(rng, n_clients)
    forward = _fold(models, counts)
    for _ in range(3):
        perm = rng.permutation(n_clients)
        shuffled = _fold([models[i] for i in perm], [counts[i] for i in perm])
        for a, b in zip(forward, shuffled):
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=TOL, atol=TOL)
    backward = _fold(models[::-1], counts[::-1])
    for a, b in zip(forward, backward):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=TOL, atol=TOL)


def test_sums_are_float64_where_float32_accumulation_loses_precision() -> None:
    """One client with 10**7 examples and many with 1 example whose contributions float32 would round away."""
    rng = np.random.default_rng(6)
    shape = (64,)
    big = [np.ones(shape, dtype=np.float32)]
    smalls = [[rng.uniform(0.1, 0.45, shape).astype(np.float32)] for _ in range(400)]
    models = [big, *smalls]
    counts = [10**7] + [1] * len(smalls)
    ref = _reference(models, counts)[0]

    # What a float32 running sum would give: at 1e7 the float32 spacing is 1.0, so every
    # contribution below 0.5 is rounded away.
    naive = np.zeros(shape, dtype=np.float32)
    for (t,), n in zip(models, counts):
        naive = naive + np.float32(n) * t
    naive_mean = naive / np.float32(sum(counts))
    naive_err = np.abs(naive_mean.astype(np.float64) - ref).max()
    assert naive_err > 1e-5, "the case must be one where float32 accumulation is visibly wrong"

    acc = FedAvg(big)
    for (t,), n in zip(models, counts):
        acc.add([t], n)
    assert all(s.dtype == np.float64 for s in acc._sum)
    (got,) = acc.result()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=TOL, atol=TOL)
    assert np.abs(got.astype(np.float64) - ref).max() < naive_err / 10


def test_huge_sample_counts_do_not_overflow() -> None:
    """Counts far beyond int32 are folded exactly enough (weights are float64, totals Python ints)."""
    rng = np.random.default_rng(7)
    models = _models(rng, 3)
    counts = [2**40, 3, 2**35]
    _assert_close(_fold(models, counts), _reference(models, counts), models[0])


# ---------------------------------------------------------------- validation and reset


def test_add_rejects_wrong_tensor_count() -> None:
    rng = np.random.default_rng(8)
    (model,) = _models(rng, 1)
    acc = FedAvg(model)
    with pytest.raises(ValueError, match="tensors"):
        acc.add(model[:-1], 5)
    with pytest.raises(ValueError, match="tensors"):
        acc.add([*model, np.zeros(3, np.float32)], 5)
    with pytest.raises(ValueError, match="tensors"):
        acc.add([], 5)
    # Rejected adds leave nothing behind.
    assert acc.count == 0 and acc.total_examples == 0
    with pytest.raises(ValueError):
        acc.result()


@pytest.mark.parametrize("bad", [0, -1, -(10**6)])
def test_add_rejects_non_positive_sample_count(bad: int) -> None:
    rng = np.random.default_rng(9)
    a, b = _models(rng, 2)
    acc = FedAvg(a)
    acc.add(a, 10)
    with pytest.raises(ValueError, match="num_examples"):
        acc.add(b, bad)
    assert acc.count == 1 and acc.total_examples == 10
    # The rejected model did not leak into the sums.
    _assert_close(acc.result(), [t.astype(np.float64) for t in a], a)


def test_result_with_nothing_added_raises() -> None:
    acc = FedAvg([np.zeros((2,), np.float32)])
    with pytest.raises(ValueError):
        acc.result()


def test_reset_forgets_everything() -> None:
    rng = np.random.default_rng(10)
    models = _models(rng, 6)
    acc = FedAvg(models[0])
    for t, n in zip(models[:5], [5, 1, 10**6, 3, 9]):
        acc.add(t, n)
    acc.reset()
    assert acc.count == 0 and acc.total_examples == 0
    with pytest.raises(ValueError):
        acc.result()
    last = models[5]
    acc.add(last, 123)
    assert acc.count == 1 and acc.total_examples == 123
    _assert_close(acc.result(), [t.astype(np.float64) for t in last], last)


def test_result_can_be_read_while_folding_continues() -> None:
    """result() does not consume the accumulator: later adds build on the same sums."""
    rng = np.random.default_rng(11)
    models = _models(rng, 4)
    counts = [2, 7, 1, 10**6]
    acc = FedAvg(models[0])
    for i, (t, n) in enumerate(zip(models, counts)):
        acc.add(t, n)
        _assert_close(acc.result(), _reference(models[: i + 1], counts[: i + 1]), models[0])


def test_result_does_not_alias_internal_buffers() -> None:
    """Mutating a returned float64 result must not change the accumulator's sums."""
    template = [np.ones((3,), np.float64)]
    acc = FedAvg(template)
    acc.add(template, 2)
    (first,) = acc.result()
    first[:] = 99.0
    (second,) = acc.result()
    np.testing.assert_array_equal(second, np.ones(3))


# ---------------------------------------------------------------- fedavg() and weighted_metrics()


@pytest.mark.parametrize("n_clients", [1, 2, 7, 50])
def test_fedavg_function_equals_class(n_clients: int) -> None:
    rng = np.random.default_rng(12000 + n_clients)
    models = _models(rng, n_clients)
    counts = _counts(rng, n_clients)
    by_function = fedavg(zip(models, counts))  # any iterable, here a one-shot iterator
    by_class = _fold(models, counts)
    assert len(by_function) == len(by_class)
    for a, b in zip(by_function, by_class):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    _assert_close(by_function, _reference(models, counts), models[0])


def test_fedavg_function_with_no_models_raises() -> None:
    with pytest.raises(ValueError):
        fedavg([])
    with pytest.raises(ValueError):
        fedavg(iter(()))


def test_fedavg_function_validates_like_the_class() -> None:
    a = [np.zeros((2,), np.float32), np.zeros((3,), np.float32)]
    with pytest.raises(ValueError):
        fedavg([(a, 3), (a[:1], 3)])
    with pytest.raises(ValueError):
        fedavg([(a, 0)])


def test_weighted_metrics_sample_weighted_mean() -> None:
    items = [({"accuracy": 0.5, "loss": 2.0}, 10), ({"accuracy": 0.9, "loss": 1.0}, 30)]
    got = weighted_metrics(items)
    assert set(got) == {"accuracy", "loss"}
    assert got["accuracy"] == pytest.approx((0.5 * 10 + 0.9 * 30) / 40, rel=1e-12)
    assert got["loss"] == pytest.approx((2.0 * 10 + 1.0 * 30) / 40, rel=1e-12)


def test_weighted_metrics_skips_none_nan_and_unreported() -> None:
    items = [
        ({"accuracy": 0.5, "loss": 1.0}, 10),
        ({"accuracy": 1.0, "loss": None}, 30),  # loss not available from this client
        ({"accuracy": float("nan"), "loss": 2.0}, 60),  # accuracy NaN from this client
        ({"loss": 4.0}, 100),  # accuracy not reported at all
        ({"extra": np.float32(3.0)}, 5),  # only one client reports this metric
        ({"ghost": None, "phantom": float("nan")}, 7),  # never a usable value
    ]
    got = weighted_metrics(items)
    assert set(got) == {"accuracy", "loss", "extra"}
    # Each metric is weighted only by the clients that gave a usable value for it.
    assert got["accuracy"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40, rel=1e-12)
    assert got["loss"] == pytest.approx((1.0 * 10 + 2.0 * 60 + 4.0 * 100) / 170, rel=1e-12)
    assert got["extra"] == pytest.approx(3.0, rel=1e-12)
    assert all(math.isfinite(v) for v in got.values())
    assert all(isinstance(v, float) for v in got.values())


def test_weighted_metrics_of_nothing_is_empty() -> None:
    assert weighted_metrics([]) == {}
    assert weighted_metrics([({}, 5)]) == {}


def test_weighted_metrics_unequal_counts() -> None:
    got = weighted_metrics([({"acc": 0.0}, 1), ({"acc": 1.0}, 10**6)])
    assert got["acc"] == pytest.approx(10**6 / (10**6 + 1), rel=1e-12)


# ---------------------------------------------------------------- memory: one model, whatever N


def _owned_arrays(acc: FedAvg) -> list[np.ndarray]:
    """Every ndarray reachable from the accumulator's attributes (one level of containers)."""
    found = []
    for value in vars(acc).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        found.extend(v for v in items if isinstance(v, np.ndarray))
    return found


def test_memory_stays_one_model_and_added_arrays_are_not_retained() -> None:
    rng = np.random.default_rng(13)
    shapes = [(16, 8), (8,), (), (0, 4), (3, 3, 3)]
    template = [np.zeros(s, np.float32) for s in shapes]
    acc = FedAvg(template)
    before = _owned_arrays(acc)
    before_bytes = sum(a.nbytes for a in before)
    before_ids = {id(a) for a in before}

    refs: list[weakref.ref[np.ndarray]] = []
    for i in range(50):
        model = [(rng.standard_normal(s)).astype(np.float32) for s in shapes]
        refs.extend(weakref.ref(t) for t in model)
        acc.add(model, i + 1)
        del model
    gc.collect()

    assert len(acc._sum) == len(shapes)
    assert [s.shape for s in acc._sum] == [tuple(s) for s in shapes]
    assert all(s.dtype == np.float64 for s in acc._sum)
    after = _owned_arrays(acc)
    # The same buffers as before the first add: nothing grew with the number of clients.
    assert {id(a) for a in after} == before_ids
    assert sum(a.nbytes for a in after) == before_bytes
    alive = [r for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of {len(refs)} added arrays are still referenced after del"
    assert acc.count == 50 and acc.total_examples == sum(range(1, 51))
