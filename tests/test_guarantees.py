"""Direct tests of the guarantees the README states, each written so that breaking it fails here.

- Fencing: a driver whose lease was taken over can neither commit, close, open training,
  finish evaluation, admit nor fail the run, and what it tried changes nothing in Redis.
- Ordering: a commit only applies on top of the previous round (once); a commit that skips a
  round, or replays one, is refused and changes nothing.
- Refusal at the protocol layer: NaN or infinity in any float tensor, in any position, whole or
  compressed, is UpdateRejected('non_finite') (or 'bad_scales' for a compressed update's scales).
- Weighting: the model a real round commits is the sample-weighted mean, checked against a
  float64 reference written here (not fedq's own fedavg), with counts so unequal that an
  unweighted mean fails the same check.

The store tests use RunStore's public methods only, never its scripts' arguments.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from support.lua import assert_killed, mutant_failures

from fedq.errors import UpdateRejected
from fedq.protocol import messages
from fedq.protocol.fencing import Commit, LeaseLost
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Phase

RUN = "t-guard"
NAMES = ["w", "b"]


class _Spec:
    """What RunStore.create needs of a run spec (fedq.learning.spec.RunSpec has more)."""

    def __init__(self, rounds: int = 3, clients: int = 2) -> None:
        self.rounds, self.clients = rounds, clients

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "clients": self.clients}


def _snapshot(r: redis.Redis) -> dict[bytes, bytes]:
    """Every key of the database and its serialized value (streams, hashes, lists included)."""
    return {key: r.dump(key) for key in sorted(r.scan_iter(count=1000))}


def _global(round_no: int, value: float) -> bytes:
    return messages.encode_global(RUN, round_no, NAMES, [np.full((2, 2), value, np.float32),
                                                         np.full(2, value, np.float32)])


def _take_over(r: redis.Redis, old: RunStore) -> RunStore:
    """Let old's lease lapse and a new driver take the run, the way a standby does."""
    r.pexpire(old.k.lease, 1)
    deadline = time.monotonic() + 5
    new = RunStore(r, RUN)
    while not new.acquire_lease("driver-b", 30):
        assert time.monotonic() < deadline, "the lapsed lease was never free"
        time.sleep(0.005)
    assert new.lease_holder() == "driver-b" and old.driver == "driver-a"
    return new


def _running(r: redis.Redis, rounds: int = 3) -> RunStore:
    """A run in its training phase, driven by driver-a, with clients c0 and c1 admitted."""
    store = RunStore(r, RUN)
    store.create(_Spec(rounds=rounds))
    assert store.acquire_lease("driver-a", 30)
    for cid in ("c0", "c1"):
        assert store.join(cid, {"shard": 0}, {}) == "requested"
        assert store.admit(cid)
    assert store.open_training(b"scaler", _global(0, 0.0))
    assert store.state()["phase"] == "train" and store.committed_round() == 0
    return store


def _commit(store: RunStore, round_no: int, final: dict[str, Any] | None = None, evaluate: bool = False) -> bool:
    after = Phase.EVAL if evaluate else Phase.DONE if final is not None else Phase.TRAIN
    return store.commit_round(Commit(round=round_no, global_payload=_global(round_no, float(round_no)),
                                     metrics={"round": round_no}, after=after, final=final))


# --- fencing: a stale driver changes nothing ---------------------------------------------------

STALE_STEPS: dict[str, Callable[[RunStore], Any]] = {
    "commit_round": lambda s: _commit(s, 1),
    "commit_round (final)": lambda s: _commit(s, 1, final={"test_accuracy": 1.0}),
    "close_round": lambda s: s.close_round(1),
    "admit": lambda s: s.admit("c2"),
}


@pytest.mark.parametrize("step", STALE_STEPS)
def test_a_driver_whose_lease_was_taken_over_is_refused_and_changes_nothing(r: redis.Redis, step: str) -> None:
    old = _running(r)
    if step == "admit":
        assert old.join("c2", {"shard": 0}, {}) in ("requested", "run_full")
    new = _take_over(r, old)
    before = _snapshot(r)
    with pytest.raises(LeaseLost, match="lease lost"):
        STALE_STEPS[step](old)
    assert _snapshot(r) == before
    # The refusal is the fence, not a broken run: the new driver's commit applies.
    assert _commit(new, 1) and new.committed_round() == 1


def test_a_stale_driver_cannot_open_training(r: redis.Redis) -> None:
    old = RunStore(r, RUN)
    old.create(_Spec())
    assert old.acquire_lease("driver-a", 30)
    new = _take_over(r, old)
    before = _snapshot(r)
    with pytest.raises(LeaseLost):
        old.open_training(b"scaler", _global(0, 9.0))
    assert _snapshot(r) == before
    assert new.open_training(b"scaler", _global(0, 0.0)) and new.state()["phase"] == "train"


def test_a_stale_driver_cannot_finish_the_evaluation(r: redis.Redis) -> None:
    old = _running(r, rounds=1)
    assert _commit(old, 1, final={}, evaluate=True)
    assert old.state()["phase"] == "eval"
    new = _take_over(r, old)
    before = _snapshot(r)
    with pytest.raises(LeaseLost):
        old.finish_evaluation(1, None, {"test_accuracy": 0.1})
    assert _snapshot(r) == before
    assert new.finish_evaluation(1, None, {"test_accuracy": 0.9})
    assert new.state()["status"] == "finished"


def test_a_stale_driver_cannot_fail_the_run_nor_touch_the_new_lease(r: redis.Redis) -> None:
    old = _running(r)
    new = _take_over(r, old)
    before = _snapshot(r)
    assert old.fail("stale driver thinks the run is lost") is False
    with pytest.raises(LeaseLost):
        old.renew_lease(60)
    assert old.release_lease() is False
    assert _snapshot(r) == before
    assert new.lease_holder() == "driver-b" and 0 < r.pttl(new.k.lease) <= 30_000
    assert new.fail("the real driver gives up") and new.state()["status"] == "failed"


def test_a_store_that_never_held_the_lease_cannot_commit(r: redis.Redis) -> None:
    _running(r)
    before = _snapshot(r)
    with pytest.raises(LeaseLost):
        _commit(RunStore(r, RUN), 1)  # no driver at all: '' is no lease
    intruder = RunStore(r, RUN)
    intruder.driver = "driver-x"  # claims to drive without having acquired
    with pytest.raises(LeaseLost):
        _commit(intruder, 1)
    assert _snapshot(r) == before


# --- ordering: only on top of the previous round, exactly once -----------------------------------

def test_a_commit_applies_on_top_of_the_previous_round_exactly_once(r: redis.Redis) -> None:
    store = _running(r)
    assert _commit(store, 1)
    assert store.committed_round() == 1 and [m["round"] for m in store.metrics()] == [1]
    assert messages.decode_global(store.global_payload(), RUN)[0] == 1
    after_first = _snapshot(r)
    assert _commit(store, 1) is False  # the same commit again (a retry after a lost reply)
    assert _snapshot(r) == after_first
    assert _commit(store, 2) and store.committed_round() == 2
    assert [m["round"] for m in store.metrics()] == [1, 2]


@pytest.mark.parametrize("attempt", [0, 1, 3, 4])
def test_a_commit_that_skips_or_replays_a_round_is_refused_and_changes_nothing(r: redis.Redis, attempt: int) -> None:
    store = _running(r)
    assert _commit(store, 1)  # R = 1 is committed: only 2 may follow
    before = _snapshot(r)
    assert _commit(store, attempt) is False
    assert _commit(store, attempt, final={"test_accuracy": 1.0}) is False
    assert _snapshot(r) == before
    assert store.committed_round() == 1 and store.state()["status"] == "running"


def test_no_commit_outside_training(r: redis.Redis) -> None:
    store = _running(r, rounds=1)
    assert _commit(store, 1, final={}, evaluate=True)  # phase eval now
    before = _snapshot(r)
    assert _commit(store, 2) is False
    assert _snapshot(r) == before
    assert store.finish_evaluation(1, None, {})
    before = _snapshot(r)
    assert _commit(store, 2) is False  # finished
    assert store.finish_evaluation(1, None, {}) is False  # and it finishes once
    assert _snapshot(r) == before


def test_training_opens_once_and_evaluation_finishes_only_in_its_phase(r: redis.Redis) -> None:
    store = _running(r)
    assert _commit(store, 1)
    before = _snapshot(r)
    assert store.open_training(b"other scaler", _global(0, 5.0)) is False  # would rewind the run
    assert store.finish_evaluation(1, None, {}) is False  # training, not evaluating
    assert _snapshot(r) == before
    assert store.committed_round() == 1 and store.state()["status"] == "running"


def test_finish_evaluation_only_for_the_last_committed_round(r: redis.Redis) -> None:
    store = _running(r, rounds=2)
    assert _commit(store, 1)
    assert _commit(store, 2, final={}, evaluate=True)
    before = _snapshot(r)
    for wrong in (1, 3):
        assert store.finish_evaluation(wrong, None, {}) is False
    assert _snapshot(r) == before
    assert store.finish_evaluation(2, None, {})


def test_closing_a_round_stops_pushes_for_it_and_only_the_open_round_closes(r: redis.Redis) -> None:
    store = _running(r)
    payload = b"x" * 10
    before = _snapshot(r)
    store.close_round(2)  # not the open round: no effect
    assert _snapshot(r) == before
    assert store.push_update("c0", 1, payload, 1000) == "ok"
    store.close_round(1)
    assert store.push_update("c1", 1, payload, 1000) == "round_closed"
    assert _commit(store, 1)
    assert store.push_update("c1", 2, payload, 1000) == "ok"


def test_a_push_is_only_for_the_open_round(r: redis.Redis) -> None:
    store = _running(r)
    assert _commit(store, 1)
    assert store.push_update("c0", 1, b"u", 1000) == "round_closed"
    assert store.push_update("c0", 3, b"u", 1000) == "round_not_open"
    assert store.push_update("c0", 2, b"u", 1000) == "ok"
    assert store.push_update("stranger", 2, b"u", 1000) == "unknown_client"
    assert store.push_update("c1", 2, b"u" * 11, 10) == "too_large"


def test_a_stale_driver_cannot_admit_past_the_member_cap(r: redis.Redis) -> None:
    store = RunStore(r, RUN)
    store.create(_Spec(clients=1))
    assert store.acquire_lease("driver-a", 30)
    for cid in ("c0", "c1"):
        assert store.join(cid, {"shard": 0}, {}) in ("requested", "run_full")
    assert store.admit("c0") is True
    assert store.admit("c1") is False  # run full: its verdict is written, no member added
    assert store.member_ids() == ["c0"]


# --- refusal at the protocol layer: NaN and infinity ---------------------------------------------

FLOATS = [np.float16, np.float32, np.float64]
BAD = [np.nan, np.inf, -np.inf]


def _template(dtype: type) -> tuple[list[np.ndarray], list[messages.TensorSpec]]:
    tensors = [np.ones((3, 4), dtype), np.zeros(5, dtype), np.full((1,), 2.0, dtype)]
    return tensors, messages.template_of(["a", "b", "c"], tensors)


def _validate(payload: bytes, template: list[messages.TensorSpec], **kw: Any) -> messages.Update:
    return messages.validate_update(payload, run_id=RUN, round_no=1, client_id="c0", template=template, **kw)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("tensor, index", [(0, 0), (0, 7), (0, 11), (1, 4), (2, 0)])
def test_a_non_finite_value_anywhere_is_refused(dtype: type, bad: float, tensor: int, index: int) -> None:
    tensors, template = _template(dtype)
    clean = messages.encode_update(RUN, 1, "c0", 10, {}, ["a", "b", "c"], tensors)
    assert _validate(clean, template).num_examples == 10
    tensors[tensor].flat[index] = bad
    payload = messages.encode_update(RUN, 1, "c0", 10, {}, ["a", "b", "c"], tensors)
    with pytest.raises(UpdateRejected) as err:
        _validate(payload, template)
    assert err.value.reason == "non_finite"
    assert repr("abc"[tensor]) in err.value.detail


@pytest.mark.parametrize("encoding", ["float16", "int8"])
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
def test_a_non_finite_compressed_update_is_refused(encoding: str, bad: float) -> None:
    base, template = _template(np.float32)
    names = ["a", "b", "c"]
    comp = messages.compress_update(names, [t + 0.5 for t in base], base, encoding)

    def send(tensors: list[np.ndarray]) -> messages.Update:
        payload = messages.encode_update(RUN, 1, "c0", 10, {}, comp.names, tensors, compression=comp.descriptor)
        return _validate(payload, template, compression=encoding, base=base)

    np.testing.assert_allclose(send(comp.tensors).tensors[0], base[0] + 0.5, atol=0.01)
    wire = [t.copy() for t in comp.tensors]
    scales_at = len(names)
    wire[scales_at + 1][0] = bad  # a scale of tensor b
    with pytest.raises(UpdateRejected) as err:
        send(wire)
    assert err.value.reason == "bad_scales" and "NaN or infinity" in err.value.detail
    if encoding == "float16":  # the values themselves travel as float16: NaN fits in them
        wire = [t.copy() for t in comp.tensors]
        wire[0].flat[5] = bad
        with pytest.raises(UpdateRejected) as err:
            send(wire)
        assert err.value.reason == "non_finite"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_finite_delta_that_overflows_on_the_global_model_is_refused() -> None:
    base, template = _template(np.float32)
    base = [t.copy() for t in base]
    base[0].flat[3] = np.finfo(np.float32).max
    names = ["a", "b", "c"]
    comp = messages.compress_update(names, base, [np.zeros_like(t) for t in base], "float16")
    # A finite delta (1.0 x 1e38) that is infinite once added to float32's largest value.
    wire = [t.copy() for t in comp.tensors]
    wire[0][...] = np.float16(1.0)
    wire[len(names)][0] = np.float32(1e38)
    payload = messages.encode_update(RUN, 1, "c0", 10, {}, comp.names, wire, compression=comp.descriptor)
    with pytest.raises(UpdateRejected) as err:
        _validate(payload, template, compression="float16", base=base)
    assert err.value.reason == "non_finite"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_non_finite_metric_is_refused(bad: float) -> None:
    tensors, template = _template(np.float32)
    payload = messages.encode_update(RUN, 1, "c0", 10, {"loss": bad}, ["a", "b", "c"], tensors)
    with pytest.raises(UpdateRejected) as err:
        _validate(payload, template)
    assert err.value.reason == "bad_metrics"


def test_integer_tensors_have_no_non_finite_values_to_refuse() -> None:
    tensors = [np.ones((2, 2), np.float32), np.array([7, -3], np.int64)]
    template = messages.template_of(["w", "step"], tensors)
    payload = messages.encode_update(RUN, 1, "c0", 10, {}, ["w", "step"], tensors)
    assert _validate(payload, template).tensors[1].tolist() == [7, -3]


# --- weighting: a real round against an independent float64 reference ---------------------------

COUNTS = {"c0": 3, "c1": 40, "c2": 957}  # very unequal: an unweighted mean is far off


def _reference_mean(models: dict[str, list[np.ndarray]], counts: dict[str, int]) -> list[np.ndarray]:
    """The sample-weighted mean, in float64 from first principles: sum(n_i * w_i) / sum(n_i)."""
    total = float(sum(counts[c] for c in models))
    out = []
    for i, like in enumerate(next(iter(models.values()))):
        acc = np.zeros(like.shape, np.float64)
        for cid, tensors in models.items():
            acc += np.asarray(tensors[i], np.float64) * float(counts[cid])
        out.append((acc / total).astype(like.dtype))
    return out


def _close(got: list[np.ndarray], want: list[np.ndarray]) -> bool:
    return all(g.shape == w.shape and np.allclose(g, w, rtol=1e-6, atol=1e-6) for g, w in zip(got, want))


@pytest.fixture()
def lean_run(r: redis.Redis, redis_url: str) -> Iterator[RunStore]:
    """A two-round run of three clients, its aggregator in this process (no central evaluation,
    so it holds no Keras model; its initial model stored with it), the clients joined by hand."""
    from support.initial import store_initial

    from fedq.learning.partition import load_shard
    from fedq.learning.scaling import feature_stats
    from fedq.learning.spec import RunSpec
    from fedq.protocol.connection import connect
    from fedq.roles.aggregator import Aggregator, AggregatorStopped
    from fedq.settings import Settings

    settings = Settings.from_env(env={}, redis_url=redis_url, block_seconds=0.2)
    spec = RunSpec(clients=3, rounds=2, round_timeout=60, run_id="t-weights", central_eval=False).validate()
    store_initial(r, spec.run_id)  # stored with the run (support.initial): no TensorFlow child
    store = RunStore(r, spec.run_id)
    store.create(spec)
    agg = Aggregator(connect(settings), settings, spec.run_id)

    def drive() -> None:
        try:
            agg.run()
        except AggregatorStopped:
            pass

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    try:
        for k, cid in enumerate(COUNTS):
            x, _ = load_shard(spec.data, k, 3)
            assert store.join_and_wait(cid, {"shard": k}, feature_stats(x).to_dict()) == "joined"
        _wait_for(lambda: store.state().get("phase") == "train", store, "training to open")
        yield store
    finally:
        agg.stop.set()
        thread.join(timeout=30)


def _wait_for(cond: Callable[[], bool], store: RunStore, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert store.state().get("status") != "failed", store.state().get("reason")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
def test_committed_models_are_the_sample_weighted_mean_in_float64(lean_run: RunStore) -> None:
    store = lean_run
    rng = np.random.default_rng(7)
    for round_no in (1, 2):
        g_round, names, g = messages.decode_global(store.global_payload(), store.run_id)
        assert g_round == round_no - 1
        # Each client's model sits at its own distance from the global one, so that the weights matter.
        models = {cid: [(t + (k + 1) * 0.5 + rng.normal(0, 0.1, t.shape)).astype(t.dtype) for t in g]
                  for k, cid in enumerate(COUNTS)}
        for cid, tensors in models.items():
            payload = messages.encode_update(store.run_id, round_no, cid, COUNTS[cid], {"loss": 1.0}, names, tensors)
            assert store.push_update(cid, round_no, payload, 1 << 30) == "ok"
        _wait_for(lambda n=round_no: store.committed_round() >= n, store, f"round {round_no} to commit")
        committed, _, got = messages.decode_global(store.global_payload(), store.run_id)
        assert committed == round_no
        want = _reference_mean(models, COUNTS)
        assert _close(got, want), f"round {round_no}: the committed model is not the weighted mean"
        # The check can tell: the unweighted mean (and a mean weighted the wrong way round) fail it.
        assert not _close(got, _reference_mean(models, {c: 1 for c in COUNTS}))
        assert not _close(got, _reference_mean(models, {c: 1000 - n for c, n in COUNTS.items()}))
        record = store.metrics()[-1]
        assert record["num_examples"] == sum(COUNTS.values())
        assert {c: v["num_examples"] for c, v in record["clients"].items()} == COUNTS


# --- the hemodialysis acceptance test cannot pass by skipping where it must run -----------------

def _seed_data_problem() -> str | None:
    """Why the acceptance tests' skip would hide a failure here, or None when a skip is honest
    (or the data is there)."""
    from support.data import SEED_DATA_ENV, seed_data_dir
    if seed_data_dir() is not None:
        return None
    if os.environ.get(SEED_DATA_ENV):
        return (f"{SEED_DATA_ENV}={os.environ[SEED_DATA_ENV]!r} holds no normal.csv and abnormal.csv: "
                "the acceptance tests would skip")
    return None


def test_the_seed_data_is_there_wherever_the_acceptance_test_must_run() -> None:
    """The acceptance tests skip (naming FEDQ_SEED_DATA_DIR) on a checkout without the seed's
    CSVs; where they were asked to run (FEDQ_SEED_DATA_DIR is set), a directory without them fails
    here instead of passing silently."""
    from support.data import SEED_DATA_MISSING, seed_data_dir
    problem = _seed_data_problem()
    if problem:
        pytest.fail(problem)
    if seed_data_dir() is None:
        pytest.skip(SEED_DATA_MISSING)


def test_a_seed_data_directory_that_is_named_but_empty_fails(tmp_path, monkeypatch) -> None:
    """A clone without shared/ beside it (CI clones elsewhere) skips, saying why; a directory
    that was named and holds no CSVs is a mistake, and fails."""
    import support.data

    monkeypatch.setattr(support.data, "ROOT", tmp_path / "checkout")  # no shared/ beside it
    monkeypatch.delenv("FEDQ_SEED_DATA_DIR", raising=False)
    assert _seed_data_problem() is None  # the skip says why
    monkeypatch.setenv("FEDQ_SEED_DATA_DIR", str(tmp_path / "nowhere"))
    assert "nowhere" in (_seed_data_problem() or "")


def test_the_acceptance_test_skips_naming_the_setting(tmp_path, monkeypatch) -> None:
    e2e = (Path(__file__).parent / "test_e2e.py").read_text()  # read, not imported: no test imports another
    assert "skipif(seed_data_dir() is None, reason=SEED_DATA_MISSING)" in e2e.replace("\n", " ")
    from support.data import seed_data_dir

    monkeypatch.setenv("FEDQ_SEED_DATA_DIR", str(tmp_path))  # set, but empty: no fallback to shared/
    assert seed_data_dir() is None
    (tmp_path / "normal.csv").write_text("")
    (tmp_path / "abnormal.csv").write_text("")
    assert seed_data_dir() == tmp_path


# --- weighting: survivors of the mutation run in aggregate.py ------------------------------------

def test_capped_weights_refuses_what_it_cannot_honour() -> None:
    from fedq.learning.aggregate import capped_weights

    for share in (0, -0.1, 1.5, 2):
        with pytest.raises(ValueError, match=r"max_share must be in \(0, 1\]"):
            capped_weights({"a": 1, "b": 2}, share)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="counts must be positive"):
            capped_weights({"a": bad, "b": 5}, 0.5)


def test_a_cap_below_two_rounds_down_so_the_share_holds() -> None:
    from fedq.learning.aggregate import capped_weights

    # Cap 0.6 x 1 / 0.4 = 1.5: the big claim gets weight 1 (a share of 1/2); 2 would be 2/3 > 0.6.
    assert capped_weights({"a": 1, "c": 1000}, 0.6) == {"a": 1, "c": 1}


def test_fedavg_of_nothing_and_metrics_of_no_samples() -> None:
    from fedq.learning.aggregate import fedavg, weighted_metrics

    with pytest.raises(ValueError, match="no models to aggregate"):
        fedavg([])
    assert weighted_metrics([({"loss": 1.0}, 0)]) == {}
    assert weighted_metrics([({"loss": 1.0}, 1), ({"loss": 4.0}, 3)]) == {"loss": 3.25}


# --- fencing and refusal: survivors of the mutation run in store.py and messages.py -------------

def test_a_held_lease_is_not_taken_and_renewal_extends_it_by_its_ttl(r: redis.Redis) -> None:
    a, b = RunStore(r, RUN), RunStore(r, RUN)
    assert a.acquire_lease("driver-a", 5)
    assert b.acquire_lease("driver-b", 5) is False and b.driver is None
    assert a.lease_holder() == "driver-a"
    a.renew_lease(60)
    assert 55_000 < r.pttl(a.k.lease) <= 60_000
    b.driver = "driver-b"
    with pytest.raises(LeaseLost, match="held by 'driver-a'"):
        b.renew_lease(60)


@pytest.mark.parametrize("change, reason, words", [
    (lambda names, ts: (names[:1], ts[:1]), "wrong_shape", "has 1 tensors, the model has 2"),
    (lambda names, ts: (["x", names[1]], ts), "wrong_shape", "'x' where the model has 'w'"),
    (lambda names, ts: (names, [ts[0].astype(np.float64), ts[1]]), "wrong_dtype", "float64, expected float32"),
    (lambda names, ts: (names, [ts[0], np.zeros(3, np.float32)]), "wrong_shape", "shape [3], expected [2]"),
])
def test_an_update_unlike_the_model_is_refused_with_its_reason(change, reason: str, words: str) -> None:
    tensors = [np.ones((2, 2), np.float32), np.zeros(2, np.float32)]
    template = messages.template_of(NAMES, tensors)
    names, sent = change(NAMES, tensors)
    payload = messages.encode_update(RUN, 1, "c0", 10, {}, names, sent)
    with pytest.raises(UpdateRejected) as err:
        _validate(payload, template)
    assert err.value.reason == reason and words in err.value.detail


# --- hand-written mutants of the Lua steps ------------------------------------------------------
# Python mutation tools (mutmut) do not mutate the Lua inside fedq/protocol/scripts.py's strings,
# so the fences and round checks are mutated here: the script text is patched (one small breaking
# change), every store check above runs against a real Redis, and at least one must fail. A mutant
# that no longer matches its script fails too, so that a rewrite of the scripts brings this list
# up to date instead of silently testing nothing.

FENCE = r"^if [^\n]*redis\.call\('GET', [^\n]*\) ~= [^\n]* then return -1 end\n"

# (script, pattern, replacement): each pattern must match exactly once in its script.
MUTANTS: dict[str, tuple[str, str, str]] = {
    "commit: no lease fence": ("COMMIT", FENCE, ""),
    "commit: fence inverted": ("COMMIT", r"(redis\.call\('GET', [^\n]*\)) ~= ([^\n]* then return -1)", r"\1 == \2"),
    "commit: not only on top of the previous round": ("COMMIT", r"^if tonumber\(st\[3\]\) \+ 1 ~= [^\n]*\n", ""),
    "commit: skips a round": ("COMMIT", r"\+ 1 ~= a\.round", "+ 2 ~= a.round"),
    "commit: may run ahead": ("COMMIT", r"\+ 1 ~= (a\.round)", r"+ 1 > \1"),
    "commit: a replay counts as done": ("COMMIT", r"(\+ 1 ~= a\.round) then return 0 end", r"\1 then return 1 end"),
    "commit: outside training": ("COMMIT",
                                 r"^if st\[1\] ~= STATUS_RUNNING or st\[2\] ~= PHASE_TRAIN then return 0 end\n", ""),
    "close: no lease fence": ("CLOSE", FENCE, ""),
    "close: any round": ("CLOSE", r"^if cur \+ 1 ~= [^\n]*\n", ""),
    "open_training: no lease fence": ("OPEN_TRAINING", FENCE, ""),
    "open_training: outside joining": ("OPEN_TRAINING", r"^if \(st\[1\][^\n]*then return 0 end\n", ""),
    "finish_evaluation: no lease fence": ("FINISH_EVAL", FENCE, ""),
    "finish_evaluation: any round": ("FINISH_EVAL", r" or tonumber\(st\[3\]\) ~= a\.round", ""),
    "finish_evaluation: outside evaluation": ("FINISH_EVAL", r" or st\[2\] ~= PHASE_EVAL", ""),
    "fail: no lease fence": ("FAIL", FENCE, ""),
    "admit: no lease fence": ("ADMIT", FENCE, ""),
    "admit: past the member cap": ("ADMIT", r"^if redis\.call\('SCARD'[^\n]*\n[^\n]*\n\s*return 0\nend\n", ""),
    "renew: for anyone": ("RENEW", r"^if redis\.call\('GET', KEYS\[1\]\) == ARGV\[1\] then", "if true then"),
    "release: for anyone": ("RELEASE", r"^if redis\.call\('GET', KEYS\[1\]\) == ARGV\[1\] then", "if true then"),
    "push: into a closed round": ("PUSH", r"a\.round <= math\.max", "a.round < math.max"),
    "push: into a round not yet open": ("PUSH", r"a\.round > committed \+ 1", "a.round > committed + 2"),
    "push: from a stranger": ("PUSH", r"'SISMEMBER', a\.members, a\.client\) == 0",
                              "'SISMEMBER', a.members, a.client) == 2"),
}


def _checks() -> list[tuple[str, Callable[[redis.Redis], None]]]:
    """The store checks of test_guarantees, each a call on a freshly emptied Redis."""
    stale = test_a_driver_whose_lease_was_taken_over_is_refused_and_changes_nothing
    out_of_order = test_a_commit_that_skips_or_replays_a_round_is_refused_and_changes_nothing
    out: list[tuple[str, Callable[[redis.Redis], None]]] = [
        (f"stale {step}", lambda r, step=step: stale(r, step)) for step in STALE_STEPS]
    out += [(f"out of order {a}", lambda r, a=a: out_of_order(r, a)) for a in (0, 1, 3, 4)]
    for fn in (test_a_stale_driver_cannot_open_training, test_a_stale_driver_cannot_finish_the_evaluation,
               test_a_stale_driver_cannot_fail_the_run_nor_touch_the_new_lease,
               test_a_store_that_never_held_the_lease_cannot_commit,
               test_a_commit_applies_on_top_of_the_previous_round_exactly_once, test_no_commit_outside_training,
               test_training_opens_once_and_evaluation_finishes_only_in_its_phase,
               test_finish_evaluation_only_for_the_last_committed_round,
               test_closing_a_round_stops_pushes_for_it_and_only_the_open_round_closes,
               test_a_push_is_only_for_the_open_round, test_a_stale_driver_cannot_admit_past_the_member_cap):
        out.append((fn.__name__, fn))
    return out


def test_the_unmutated_scripts_pass_every_check(r: redis.Redis) -> None:
    assert mutant_failures(r, _checks()) == []


@pytest.mark.parametrize("mutant", MUTANTS)
def test_each_lua_mutant_fails_a_guarantee_test(r: redis.Redis, monkeypatch: pytest.MonkeyPatch, mutant: str) -> None:
    assert_killed(r, monkeypatch, MUTANTS, mutant, _checks())
