"""Strategies on the real round protocol: an in-process aggregator against a real Redis, clients
as direct pushes (the pattern of test_rounds.py). Robust commits, server optimiser state across a
takeover, client sampling, the memory cap, and federated evaluation with its final phase."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import redis
from support.federation import noisy as _noisy
from support.wait import wait_until

from fedq.learning import evaluation
from fedq.learning.dataspec import DataSpec
from fedq.learning.spec import RunSpec, load_spec
from fedq.learning.strategies import Strategy, StrategySpec, aggregate_all
from fedq.protocol import codec
from fedq.protocol.store import RunStore


def test_robust_round_commits_the_median_of_the_accepted_updates(federation_factory) -> None:
    run = federation_factory(RunSpec(clients=3, rounds=1, round_timeout=60, run_id="t-median",
                           strategy=StrategySpec(name="fedmedian")))
    _, _, g = run.global_model()
    ups = [_noisy(g, 1), _noisy(g, 2), [t + 100 for t in g]]  # c2 is far off
    for k, u in enumerate(ups):
        assert run.push_tensors(f"c{k}", 1, u, 10 * (k + 1)) == "ok"
    run.wait_round(1)
    _, _, new = run.global_model()
    want = [np.median(np.stack([u[i] for u in ups]).astype(np.float64), axis=0) for i in range(len(g))]
    for got, w in zip(new, want):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-6)
    m = run.store.metrics()[0]
    assert m["num_updates"] == 3 and m["num_examples"] == 60


def test_server_state_survives_a_takeover_mid_round(federation_factory) -> None:
    spec = RunSpec(clients=2, rounds=3, round_timeout=60, run_id="t-adam",
                   strategy=StrategySpec(name="fedadam", server_lr=0.05))
    run = federation_factory(spec)
    _, _, g0 = run.global_model()
    pushed: list[list[tuple[list[np.ndarray], int]]] = []

    def play(round_no: int, upto: int = 2) -> None:
        _, _, g = run.global_model()
        if len(pushed) < round_no:
            pushed.append([(_noisy(g, 100 * round_no + k), 50 + k) for k in range(2)])
        for k in range(upto):
            assert run.push_tensors(f"c{k}", round_no, *pushed[round_no - 1][k]) == "ok"

    play(1)
    run.wait_round(1)
    play(2, upto=1)  # mid-round 2: one update stored, then the driver goes away
    wait_until(lambda: run.store.r.llen(run.store.k.inbox) == 0, "the driver to fold c0's update")
    run.stop_aggregator()
    assert run.store.committed_round() == 1
    state = codec.decode(run.store.server_state_payload())
    assert state.meta["round"] == 1 and state.meta["strategy"] == "fedadam"
    run.start_aggregator()  # a new driver resumes round 2 from Redis, server state included
    play(2)  # c0's re-push of the same update, and c1's
    run.wait_round(2)
    play(3)
    run.wait_round(3)
    wait_until(lambda: run.store.state().get("status") == "finished", "the run to finish")

    expected, x = Strategy(spec.strategy, g0), g0
    for ups in pushed:
        x = aggregate_all(spec.strategy, ups, x, strategy=expected)
    _, _, final = run.global_model()
    for got, want in zip(final, x):
        np.testing.assert_array_equal(got, want)
    assert codec.decode(run.store.server_state_payload()).meta["round"] == 3
    # Without the saved state the new driver would have restarted the moments: a different model.
    fresh, y = Strategy(spec.strategy, g0), aggregate_all(spec.strategy, pushed[0], g0)
    for ups in pushed[1:]:
        y = aggregate_all(spec.strategy, ups, y, strategy=fresh)
    assert any(not np.array_equal(a, b) for a, b in zip(final, y))


def test_sampled_rounds_train_only_the_chosen_clients(federation_factory) -> None:
    spec = RunSpec(clients=4, rounds=2, round_timeout=60, run_id="t-sample", fraction_fit=0.5, seed=3)
    run = federation_factory(spec)
    for round_no in (1, 2):
        chosen = run.store.selected(round_no)
        assert chosen is not None and len(chosen) == 2, chosen  # published before anyone trains
        _, _, g = run.global_model()
        other = sorted({f"c{k}" for k in range(4)} - chosen)[0]
        assert run.push_tensors(other, round_no, _noisy(g, 1), 10) == "not_selected"
        for k, cid in enumerate(sorted(chosen)):
            assert run.push_tensors(cid, round_no, _noisy(g, round_no * 10 + k), 10) == "ok"
        run.wait_round(round_no)
        m = run.store.metrics()[-1]
        assert m["num_updates"] == 2 and sorted(m["clients"]) == m["selected"] == sorted(chosen)
    assert run.store.state()["status"] == "finished"
    refusals = [(x["reason"], x["stage"]) for x in run.store.refused()]
    assert refusals == [("not_selected", "push")] * 2
    # The choice is a function of (seed, round, sorted joined ids) only.
    from fedq.learning.strategies import select_clients
    assert set(select_clients([f"c{k}" for k in range(4)], 0.5, 3, 2)) == set(run.store.metrics()[1]["selected"])


def test_a_robust_run_over_the_memory_cap_is_refused_with_a_clear_reason(federation_factory) -> None:
    spec = RunSpec(clients=5, rounds=1, run_id="t-cap", strategy=StrategySpec(name="krum", max_held_mb=0.001))
    run = federation_factory(spec, join=False)
    wait_until(lambda: run.store.state().get("status") == "failed", "the run to be refused")
    reason = run.store.state()["reason"]
    assert "holds all 5 updates" in reason and "--max-held-mb" in reason, reason


def test_federated_evaluation_rides_on_updates_then_a_final_phase(federation_factory) -> None:
    spec = RunSpec(clients=3, rounds=2, round_timeout=60, run_id="t-fedeval", data=DataSpec(val_fraction=0.2))
    run = federation_factory(spec)
    _, _, g = run.global_model()
    for k in range(3):
        assert run.push_tensors(f"c{k}", 1, _noisy(g, k), 20) == "ok"
    run.wait_round(1)
    assert "fed_eval_accuracy" not in run.store.metrics()[0]
    _, _, g = run.global_model()
    # Round 2's updates carry each client's evaluation of the round-1 model (rows 4, 5, 5).
    evals = [dict(eval_loss=0.4, eval_accuracy=0.75, eval_examples=4.0, eval_tp=2.0, eval_fp=1.0, eval_fn=0.0,
                  eval_tn=1.0),
             dict(eval_loss=0.2, eval_accuracy=1.0, eval_examples=5.0, eval_tp=3.0, eval_fp=0.0, eval_fn=0.0,
                  eval_tn=2.0),
             dict(eval_loss=9.0, eval_accuracy=1.0, eval_examples=500.0)]  # c2 claims rows it does not hold
    for k in range(3):
        assert run.push_tensors(f"c{k}", 2, _noisy(g, 10 + k), 20, **evals[k]) == "ok"
    wait_until(lambda: run.store.state().get("phase") == "eval", "the final evaluation phase")
    first = run.store.metrics()[0]
    assert first["fed_eval_examples"] == 9 and first["fed_eval_accuracy"] == pytest.approx((0.75 * 4 + 5) / 9)
    assert first["fed_eval_precision"] == pytest.approx(5 / 6) and first["fed_eval_recall"] == 1.0
    assert run.store.state()["status"] == "running"
    # The last model has no next round: clients evaluate it and push the result.
    assert run.push_tensors("c0", 3, g, 1) == "run_not_training"
    msg = evaluation.encode_eval(spec.run_id, 2, "c0", evals[0])
    assert run.store.push_eval("c0", 2, msg, 4096) == "ok"
    assert run.store.push_eval("c1", 1, msg, 4096) == "wrong_round"
    assert run.store.push_eval("c1", 2, evaluation.encode_eval(spec.run_id, 2, "c1", evals[1]), 4096) == "ok"
    assert run.store.push_eval("c2", 2, b"{not json", 4096) == "ok"  # stored, refused by the aggregator
    wait_until(lambda: run.store.state().get("status") == "finished", "the run to finish")
    last = run.store.metrics()[1]
    assert last["fed_eval_examples"] == 9
    final = json.loads(run.store.state()["final"])
    assert final["fed_eval_accuracy"] == last["fed_eval_accuracy"] and final["test_accuracy"] == last["test_accuracy"]
    assert {"test_auc", "test_f1"} <= set(final)
    reasons = {(x["client"], x["reason"], x["stage"]) for x in run.store.refused()}
    assert ("c1", "wrong_round", "evaluate") in reasons and ("c2", "undecodable", "aggregate") in reasons
    assert not any(run.store.r.exists(run.store.k.evaluation(c)) for c in run.store.member_ids())


def test_spec_round_trips_through_redis_with_strategy_and_sampling(r: redis.Redis) -> None:
    spec = RunSpec(clients=6, fraction_fit=0.5, run_id="t-spec", data=DataSpec(partition="dirichlet", alpha=0.3),
                   strategy=StrategySpec(name="trimmed-mean", trim_fraction=0.3, clip_norm=2.0)).validate()
    store = RunStore(r, spec.run_id)
    store.create(spec)
    assert load_spec(store) == spec and load_spec(store).clients_per_round == 3
    old = dataclasses.replace(spec, run_id="t-old").to_dict()
    del old["strategy"], old["fraction_fit"]  # a spec written before strategies existed
    assert RunSpec.from_dict(old).strategy == StrategySpec() and RunSpec.from_dict(old).fraction_fit == 1.0
