"""Without central evaluation the aggregator holds no model: the float64 sum is all it keeps.

Checked here: the mean written out slice by slice is the mean written whole; the strategies that
may stream say so; and rounds through a real Redis whose aggregator never builds a Keras model
in its own process (the initial model comes from a child process) commit the exact FedAvg,
refuse a damaged part and go on.
"""

from __future__ import annotations

import numpy as np
import pytest
from support.initial import store_initial

from fedq.learning.aggregate import FedAvg, fedavg
from fedq.learning.data import load_dataset
from fedq.learning.models import build_model, weight_names
from fedq.learning.partition import load_shard
from fedq.learning.scaling import feature_stats
from fedq.learning.spec import RunSpec
from fedq.learning.strategies import Strategy, StrategySpec
from fedq.protocol import chunking, codec, transfer
from fedq.protocol.connection import connect
from fedq.protocol.store import RunStore
from fedq.roles.aggregator import Aggregator
from fedq.settings import Settings

CHUNK = 1024  # the smallest chunk: the seed model goes in two parts


def _model(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(size=s).astype(np.float32) for s in ((3, 5), (5,), (700, 9), (9,), (1,))]


@pytest.mark.parametrize("offset, length", [(0, 15), (10, 10), (14, 2), (0, 6325), (6300, 25), (20, 6000), (6324, 1)])
def test_a_slice_of_the_mean_is_that_slice_of_the_whole_mean(offset: int, length: int) -> None:
    rng = np.random.default_rng(0)
    acc = FedAvg(_model(rng))
    for n in (3, 40, 7):
        acc.add(_model(rng), n)
    whole = np.concatenate([t.reshape(-1) for t in acc.result()])
    got = acc.result_slice(offset, length)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, whole[offset:offset + length])
    with pytest.raises(ValueError, match="outside"):
        acc.result_slice(6325, 10)


def test_parts_made_from_slices_are_the_parts_of_the_whole_model_byte_for_byte() -> None:
    model = _model(np.random.default_rng(1))
    flat = np.concatenate([t.reshape(-1) for t in model])
    whole = list(chunking.encode_parts(model, 4096))
    sliced = list(chunking.encode_parts_from(lambda o, n: flat[o:o + n], flat.size, "<f4", 4096))
    assert sliced == whole
    assert chunking.layout_for(flat.size, "<f4", 4096, [d for _, d in sliced]) == \
        chunking.layout_of(model, 4096, [d for _, d in whole])


@pytest.mark.parametrize("name, extra, streams", [
    ("fedavg", {}, True), ("fedprox", {}, True), ("fedavgm", {}, False), ("fedadam", {}, False),
    ("fedmedian", {}, False), ("fedavg", {"clip_norm": 1.0}, False),
])
def test_only_a_plain_mean_streams_its_result_and_may_go_without_the_global_model(name, extra, streams) -> None:
    template = _model(np.random.default_rng(2))
    s = Strategy(StrategySpec(name=name, **extra).resolved(), template)
    assert s.streams_result is streams
    if streams:
        s.begin_round(None)
        s.add(template, 10)
        np.testing.assert_array_equal(s.result_slice(0, 15), template[0].reshape(-1))
    else:
        with pytest.raises(ValueError, match="needs the round's global model"):
            s.begin_round(None)


def _lean(harness_factory, monkeypatch, run_id: str, rounds: int, r=None):
    """A lean run of three clients whose models travel in 2 parts. The initial model is built by
    the child process the aggregator spawns, or, given r, stored with the run beforehand
    (support.initial: no TensorFlow anywhere)."""
    # The aggregator must not build the model itself: the child process it spawns does (a fresh
    # interpreter, untouched by this patch), so a build here fails the test.
    def no_build(*_a, **_k):
        raise AssertionError("the lean aggregator built a Keras model in its own process")

    monkeypatch.setattr("fedq.roles.preparing.build_model", no_build)
    if r is not None:
        store_initial(r, run_id, chunk_bytes=CHUNK)
    h = harness_factory(rounds, run_id, {"central_eval": False}, chunk_bytes=CHUNK)
    g_round, names, g = transfer.read_global(h.store)
    assert g_round == 0 and codec.decode(h.store.global_payload()).meta["parts"]["count"] == 2
    return h, names, g


@pytest.mark.slow
def test_rounds_without_central_evaluation_commit_the_exact_fedavg_and_report_no_test_metrics(
        harness_factory, monkeypatch) -> None:
    h, names, g = _lean(harness_factory, monkeypatch, "t-lean", rounds=2)
    # The child built the same initial model a run with central evaluation starts from.
    ds = load_dataset(h.spec.data)
    model = build_model(h.spec.model, ds.num_features, ds.num_classes, h.spec.seed)
    assert names == weight_names(model)
    for got, want in zip(g, model.get_weights()):
        np.testing.assert_array_equal(got, want)
    rng = np.random.default_rng(3)
    for round_no in (1, 2):
        models = {cid: ([(t + rng.normal(0, 0.1, t.shape)).astype(np.float32) for t in g], n)
                  for cid, n in (("c0", 100), ("c1", 300), ("c2", 7))}
        for cid, (tensors, n) in models.items():
            pushed = transfer.push_update(h.store, cid, round_no, n, {"loss": 0.5}, names, tensors,
                                          chunk_bytes=CHUNK, max_bytes=h.settings.max_update_bytes)
            assert pushed.outcome == "ok" and pushed.parts == 2
        h.wait_round(round_no)
        got_round, _, g = transfer.read_global(h.store)
        assert got_round == round_no
        for got, want in zip(g, fedavg(list(models.values()))):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    h.thread.join(timeout=30)
    assert h.store.state()["status"] == "finished"
    last = h.store.metrics()[-1]
    assert last["test_accuracy"] is None and last["test_loss"] is None and last["num_updates"] == 3
    assert h.store.model_file() is None  # no Keras model here, so no model.keras (the dashboard serves weights.npz)


@pytest.mark.slow
def test_without_central_evaluation_a_damaged_part_is_refused_and_the_round_goes_on(
        harness_factory, monkeypatch, r) -> None:
    h, names, g = _lean(harness_factory, monkeypatch, "t-lean-bad", rounds=1, r=r)
    good = {"c0": ([(t + 1).astype(np.float32) for t in g], 100), "c1": ([(t - 1).astype(np.float32) for t in g], 300)}
    h.push_parts("c0", 100, names, good["c0"][0])
    h.push_damaged_parts("c2", 50, names, [(t + 50).astype(np.float32) for t in g], "tampered")
    h.push_parts("c1", 300, names, good["c1"][0])
    h.wait_round(1)
    _, _, new = transfer.read_global(h.store)
    for got, want in zip(new, fedavg(list(good.values()))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert [r["reason"] for r in h.store.refused() if r["client"] == "c2"] == ["bad_part"]


@pytest.mark.slow
def test_a_model_that_fails_to_build_in_the_child_fails_the_run_with_its_reason(r, redis_url) -> None:
    settings = Settings.from_env(env={}, redis_url=redis_url, block_seconds=0.2)
    spec = RunSpec(clients=1, rounds=1, round_timeout=60, run_id="t-lean-broken", central_eval=False,
                   model="byo_models:build_broken").validate()
    store = RunStore(r, spec.run_id)
    store.create(spec)
    x, _ = load_shard(spec.data, 0, 1)
    assert store.join("c0", {"shard": 0}, feature_stats(x).to_dict()) == "requested"  # admitted by the run
    state = Aggregator(connect(settings), settings, spec.run_id).run()
    assert state["status"] == "failed"
    assert "building the initial model failed" in state["reason"] and "build_broken" in state["reason"], state


def test_simulated_clients_of_a_process_share_one_fetch_of_each_global_model(harness_factory) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fedq.roles.swarm import SharedGlobal

    h = harness_factory(2, "t-shared-global", chunk_bytes=CHUNK)
    shared = SharedGlobal()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: shared.read(h.store), range(16)))
    assert shared.fetches == 1 and all(g is got[0] for g in got)
    round_no, names, tensors = got[0]
    assert round_no == 0 and all(not t.flags.writeable for t in tensors)
    for got_t, want in zip(tensors, transfer.read_global(h.store)[2]):
        np.testing.assert_array_equal(got_t, want)
    for cid, n in (("c0", 10), ("c1", 20), ("c2", 30)):
        h.push_parts(cid, n, names, [(t + 1).astype(np.float32) for t in tensors])
    h.wait_round(1)
    assert shared.read(h.store)[0] == 1 and shared.fetches == 2  # a new round: one new fetch
    assert shared.read(h.store)[0] == 1 and shared.fetches == 2


@pytest.mark.slow
def test_folding_that_outlasts_the_lease_keeps_it(harness_factory, monkeypatch, r) -> None:
    """Folding a large update (or a rescan's many updates in a row) once ran longer than the
    lease without renewing it: the lease lapsed mid-round and the run was left to a 'new
    driver' that never came. The aggregator now renews between updates and between parts."""
    import time

    from fedq.learning.strategies import Strategy as S

    slow = S.add_part

    def add_part(self, offset, values, num_examples):
        time.sleep(1.2)  # one update's 2 parts take 2.4 s to fold, longer than the 2 s lease
        slow(self, offset, values, num_examples)

    monkeypatch.setattr(S, "add_part", add_part)
    store_initial(r, "t-lease", chunk_bytes=CHUNK)  # 2 parts; no child, no TensorFlow
    h = harness_factory(1, "t-lease", {"central_eval": False}, chunk_bytes=CHUNK, lease_seconds=2.0)
    _, names, g = transfer.read_global(h.store)
    for cid, n in (("c0", 10), ("c1", 20), ("c2", 30)):
        h.push_parts(cid, n, names, [(t + 1).astype(np.float32) for t in g])
    h.wait_round(1)
    h.thread.join(timeout=30)
    assert h.store.state()["status"] == "finished"


@pytest.mark.slow
def test_the_initial_models_child_exits_without_the_interpreters_teardown(r, redis_url, tmp_path, monkeypatch) -> None:
    """Its answer sent, the child that built the model exits on the spot: TensorFlow's teardown
    (1.3 s of CPU on 2 idle cores) would go on beside the run's first rounds. The model's exit
    hook, which a teardown would run, leaves no mark once the child is gone."""
    import os
    import time

    from support.procs import processes

    from fedq.roles.initial import build_in_child

    def live_children() -> list[int]:  # this process's spawned children still running (a zombie has exited)
        return [p.pid for p in processes().values()
                if p.ppid == os.getpid() and p.state != "Z" and "spawn_main" in p.cmdline]

    monkeypatch.setenv("FEDQ_TEST_EXIT_MARK", str(tmp_path / "mark"))
    settings = Settings.from_env(env={}, redis_url=redis_url, block_seconds=0.2)
    spec = RunSpec(clients=1, rounds=1, run_id="t-lean-exit", central_eval=False,
                   model="byo_models:build_marking_exit").validate()
    RunStore(r, spec.run_id).create(spec)
    ds = load_dataset(spec.data)
    before = set(live_children())
    env = codec.decode(build_in_child(settings, spec.run_id, ds.num_features, ds.num_classes))
    assert env.kind == "global" and len(env.tensors) == 2
    deadline = time.monotonic() + 60
    while set(live_children()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(live_children()) - before, "the child that built the model is still running"
    assert not (tmp_path / "mark").exists(), "the child ran its interpreter's teardown"
