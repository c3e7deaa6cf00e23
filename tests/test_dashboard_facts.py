"""The facts the run page and `fedq status` state, read from a real Redis through the read-only
client: latest and best test metrics, elapsed time and ETA, chart marks, a kept start time,
a stable aggregator identity, the overhead of rounds closed without a client."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from support.dashboard import make_run

from fedq.ops.dashboard import snapshot
from fedq.ops.dashboard.readonly import ReadOnlyRedis
from fedq.protocol.fencing import Commit
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Phase


@pytest.fixture()
def ro(redis_url: str) -> ReadOnlyRedis:
    return ReadOnlyRedis.from_url(redis_url)


def commit(r: redis.Redis, run_id: str, rnd: int, *, acc: float, loss: float, missing: dict[str, str] | None = None,
           clients: dict[str, dict[str, Any]] | None = None, final: bool = False, **extra: Any) -> dict[str, Any]:
    store = RunStore(r, run_id)
    store.driver = store.lease_holder()
    m = {"round": rnd, "num_updates": len(clients or {}), "num_examples": 10, "train_loss": 0.5, "train_accuracy": 0.8,
         "test_loss": loss, "test_accuracy": acc, "seconds": 2.0, "overhead_seconds": 0.1, "refused": 0,
         "clients": clients or {"client-0": {"num_examples": 10, "loss": 0.4, "accuracy": 0.9}},
         **({"missing": missing} if missing else {}), **extra}
    assert store.commit_round(Commit(round=rnd, global_payload=f"g{rnd}".encode(), metrics=m,
                                     final={"test_accuracy": acc, "test_loss": loss} if final else None,
                                     after=Phase.DONE if final else Phase.TRAIN))
    return m


def test_latest_and_best_test_metrics_with_binary_extras_and_progress(r: redis.Redis, ro: ReadOnlyRedis) -> None:
    make_run(r, "best-run", rounds=4)
    commit(r, "best-run", 1, acc=0.70, loss=0.60, test_auc=0.80, test_f1=0.7)
    commit(r, "best-run", 2, acc=0.90, loss=0.40, test_auc=0.95, test_f1=0.9)
    commit(r, "best-run", 3, acc=0.85, loss=0.45, test_auc=0.93, test_f1=0.85)
    d = snapshot.run_detail(ro, "best-run")
    t = d["test"]
    assert t["latest"]["accuracy"] == {"value": 0.85, "round": 3} and t["latest"]["auc"] == {"value": 0.93, "round": 3}
    assert t["best"]["accuracy"] == {"value": 0.90, "round": 2} and t["best"]["loss"] == {"value": 0.40, "round": 2}
    assert t["best"]["f1"]["round"] == 2 and t["best_round"] == 2
    assert "precision" not in t["latest"]  # not measured: not shown as a number
    p = d["progress"]
    assert p["mean_round_seconds"] == 2.0 and p["eta_seconds"] == 2.0  # one round to go at 2 s a round
    assert 0 <= p["elapsed_seconds"] < 60
    # every committed round has its commit time (the store's event), in order
    times = [m["ended_at"] for m in d["round_metrics"]]
    assert all(times) and times == sorted(times) and abs(times[-1] - time.time()) < 60
    commit(r, "best-run", 4, acc=0.88, loss=0.42, final=True)
    done = snapshot.run_detail(ro, "best-run")
    assert done["progress"]["eta_seconds"] is None and done["test"]["best_round"] == 2


def test_a_resume_keeps_started_and_shows_resumed_at_and_a_takeover_mark(r: redis.Redis, ro: ReadOnlyRedis) -> None:
    make_run(r, "resumed-run", rounds=4, committed=1)
    before = snapshot.run_detail(ro, "resumed-run")
    assert before["resumed_at"] is None and before["aggregator"]["id"] == "test-driver"
    assert before["aggregator"]["alive"] is True  # holds the lease
    time.sleep(0.05)
    store = RunStore(r, "resumed-run")
    r.delete(store.k.lease)
    assert store.acquire_lease("second-driver", 60)
    store.mark_started("second-driver")
    after = snapshot.run_detail(ro, "resumed-run")
    assert after["started_at"] == before["started_at"], "a resume must not overwrite when the run started"
    assert after["resumed_at"] and after["resumed_at"] > after["started_at"]
    (mark,) = [e for e in after["events"] if e["kind"] == "takeover"]
    assert mark["round"] == 1.5 and mark["driver"] == "second-driver"
    assert after["aggregator"] == {"id": "second-driver", "host": "second-driver", "alive": True,
                                   "lease_holder": "second-driver", "workers": []}


def test_the_aggregator_identity_stays_once_the_run_ends(r: redis.Redis, ro: ReadOnlyRedis) -> None:
    make_run(r, "ending-run", rounds=2, committed=1)
    running = snapshot.run_detail(ro, "ending-run")["aggregator"]
    commit(r, "ending-run", 2, acc=0.9, loss=0.3, final=True)
    ended = snapshot.run_detail(ro, "ending-run")["aggregator"]
    assert running["id"] == ended["id"] == "test-driver"
    assert running["alive"] is True and ended["alive"] is False  # the lease goes with the end


def test_quorum_closed_rounds_lost_and_returning_clients_and_overhead_without_the_wait(
        r: redis.Redis, ro: ReadOnlyRedis) -> None:
    make_run(r, "lossy-run", rounds=5)
    now = time.time()
    c0 = {"num_examples": 10, "loss": 0.4, "accuracy": 0.9, "train_seconds": 1.0, "push_time": now - 30}
    commit(r, "lossy-run", 1, acc=0.7, loss=0.5, clients={"client-0": c0, "client-1": dict(c0)})
    # round 2: client-1 died; the round waited 30 s for its heartbeat to expire
    commit(r, "lossy-run", 2, acc=0.75, loss=0.45, missing={"client-1": "heartbeat expired"},
           clients={"client-0": {**c0, "push_time": time.time() - 30}}, seconds=31.5, overhead_seconds=30.5,
           eval_seconds=0.2)
    commit(r, "lossy-run", 3, acc=0.8, loss=0.4, clients={"client-0": c0, "client-1": dict(c0)})
    # round 4: a client started training on the commit event, a moment before the driver's clock
    commit(r, "lossy-run", 4, acc=0.8, loss=0.4, overhead_seconds=-0.1)
    d = snapshot.run_detail(ro, "lossy-run")
    assert d["round_metrics"][3]["overhead_seconds"] == 0.0 and d["round_metrics"][3]["overhead_recorded"] == -0.1
    kinds = [(e["kind"], e["round"]) for e in d["events"]]
    assert ("quorum", 2) in kinds and ("lost", 2) in kinds and ("returned", 3) in kinds
    rnd2 = d["round_metrics"][1]
    assert rnd2["missing"] == {"client-1": "heartbeat expired"} and rnd2["overhead_recorded"] == 30.5
    assert rnd2["overhead_seconds"] < 2.0 and rnd2["waited_seconds"] > 28, rnd2
    assert d["round_metrics"][0]["overhead_seconds"] == 0.1 and d["round_metrics"][0]["waited_seconds"] == 0.0
    assert [p["round"] for p in d["client_curves"]["client-1"]] == [1, 3]
    assert [p["round"] for p in d["client_curves"]["client-0"]] == [1, 2, 3, 4]


def test_spec_shown_as_changes_from_the_defaults(r: redis.Redis, ro: ReadOnlyRedis) -> None:
    make_run(r, "spec-run", clients=3, rounds=4)
    changes = {c["key"]: c for c in snapshot.run_detail(ro, "spec-run")["spec_changes"]}
    assert changes["clients"]["value"] == 3 and changes["rounds"]["value"] == 4
    assert "run_id" not in changes and "batch_size" not in changes and "strategy.name" not in changes
    assert len(changes) < 8


def test_an_overfitting_run_is_pointed_out(r: redis.Redis, ro: ReadOnlyRedis) -> None:
    make_run(r, "overfit-run", rounds=6)
    for k, tl in enumerate([0.5, 0.4, 0.45, 0.5, 0.55], start=1):
        commit(r, "overfit-run", k, acc=0.8, loss=tl, train_loss=1 / k)
    note = snapshot.run_detail(ro, "overfit-run")["overfitting"]
    assert note and "test loss rose for 3 rounds" in note
