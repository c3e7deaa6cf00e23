"""A malicious client, logged in as its own ACL user, against a run with two honest clients.

Each scenario asserts: the run finishes; every round's committed model is the float64 FedAvg
of the honest updates (plus Mallory's, at the weight the rules allow, when hers was valid); the
bytes the aggregator read stay within 1.1 x (the update bytes it judged) plus one read of the
global model and a small allowance per round; the dashboard's reads and ``fedq status`` do not
fail. ``pytest tests/adversarial`` prints the table.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis
from arena import COLUMNS, CONFINED, HONEST, MALLORY, TABLE, Arena, Run
from rich.console import Console
from support.procs import cli_env, fedq_cmd
from support.table import add_row

from fedq.learning.partition import load_shard
from fedq.learning.scaling import feature_stats
from fedq.ops import acl
from fedq.ops.dashboard import snapshot
from fedq.ops.view import status_renderable
from fedq.protocol import heartbeat, transfer
from fedq.protocol.keys import RunKeys
from fedq.protocol.signing import Signer, new_keys
from fedq.protocol.store import RunStore, list_runs, newest_open_run

pytestmark = pytest.mark.slow

NOPERM = (redis.exceptions.NoPermissionError, redis.exceptions.ResponseError)
SLACK_PER_ROUND = 256 << 10  # state, metrics, spec, scaler, wake-ups: small reads of a round
Extra = Callable[[int], list[tuple[list[np.ndarray], int]]]


def _mean(models: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """FedAvg in float64, written here, independent of fedq.learning.aggregate."""
    total = float(sum(n for _, n in models))
    out = []
    for i, ref in enumerate(models[0][0]):
        acc = np.zeros(ref.shape, dtype=np.float64)
        for tensors, n in models:
            acc += tensors[i].astype(np.float64) * n
        out.append((acc / total).astype(ref.dtype))
    return out


def _tools_survive(run: Run) -> None:
    """What the dashboard and fedq status read of the run, through the dashboard's ACL user."""
    dash = run.arena.connect(acl.DASHBOARD_USER)
    detail = snapshot.run_detail(dash, run.run_id)
    json.dumps(detail)  # the API answers it as JSON
    assert run.run_id in {r["run_id"] for r in snapshot.runs_overview(dash)["runs"]}
    Console(file=io.StringIO(), width=100).print(status_renderable(dash, run.run_id))


def _check(run: Run, attack: str, extra: Extra | None = None, weights: dict[str, int] | None = None,
           refold_allowance: int = 0) -> dict[str, Any]:
    state = run.finish()
    assert state["status"] == "finished", state
    metrics = run.store.metrics()
    assert [m["round"] for m in metrics] == list(range(1, run.spec.rounds + 1))
    _, _, final = transfer.read_global(run.store)
    lost = accepted = 0
    weights = weights or {}
    for m in metrics:
        rnd = m["round"]
        lost += sum(cid not in m["clients"] for cid in HONEST)
        accepted += MALLORY in m["clients"]
        models = [(run.honest[c].pushed[rnd], weights.get(c, run.honest[c].n)) for c in HONEST]
        if MALLORY in m["clients"]:
            assert extra is not None, f"round {rnd} counted Mallory's update"
            models += extra(rnd)
        committed = run.honest["site-a"].seen.get(rnd + 1, final) if rnd < run.spec.rounds else final
        for got, want in zip(committed, _mean(models), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert lost == 0
    judged = run.store.judged()
    model_bytes = sum(t.nbytes for t in final)
    bound = 1.1 * sum(int(j["bytes"]) for j in judged) + model_bytes + SLACK_PER_ROUND * run.spec.rounds
    bound += refold_allowance
    assert run.bytes_read[0] <= bound, (run.bytes_read[0], bound)
    _tools_survive(run)
    outcomes = Counter(j["outcome"] for j in judged if j["client"] == MALLORY)
    refused = Counter(x["reason"] for x in run.store.refused()
                      if x["client"] == MALLORY and x.get("stage") != "aggregate")  # those are in judged
    outcome = ", ".join(f"{k} x{v}" for k, v in sorted((outcomes + refused).items() - {("accepted", 0)}))
    add_row(TABLE, COLUMNS, {"attack": attack, "outcome": (outcome or "nothing reached it")[:30],
                             "run": state["status"], "lost": lost, "accepted": accepted,
                             "read_mb": run.bytes_read[0] / 2**20, "bound_mb": bound / 2**20})
    return {"metrics": metrics, "judged": judged, "outcomes": outcomes, "refused": refused}


def _round_open(run: Run, round_no: int) -> None:
    run.wait(lambda: run.store.state().get("phase") == "train" and run.store.committed_round() == round_no - 1,
             f"round {round_no} to open")


def test_every_client_key_with_every_redis_type(arena: Arena) -> None:
    run = Run(arena, "adv-types", round_timeout=6)  # 42 writes and 6 reads in round 1
    assert run.mallory_joins() == "joined"
    _round_open(run, 1)
    k, m = RunKeys(run.run_id), run.mallory
    writers = {
        "string": lambda key: m.set(key, "x"),
        "list": lambda key: m.rpush(key, "x", "y"),
        "set": lambda key: m.sadd(key, "x"),
        "zset": lambda key: m.zadd(key, {"x": 1}),
        "hash": lambda key: m.hset(key, mapping={"payload": "junk", "seq": "1"}),
        "stream": lambda key: m.xadd(key, {"x": "y"}),
    }
    own = [k.update(MALLORY, 1), k.update(MALLORY, 2), k.update_body(MALLORY, 1), k.update_staged(MALLORY),
           k.evaluation(MALLORY), k.client_refused(MALLORY), k.client_pushes(MALLORY), k.alive(MALLORY),
           k.update_part(MALLORY, 1, "p", 0)]
    made = set()
    for kind, write in writers.items():
        for key in own:
            m.delete(key)
            try:
                write(key)
                made.add(kind)
            except NOPERM:
                pass  # her ACL user has no SADD or ZADD: those types she cannot make
        m.rpush(k.inbox, MALLORY)
        _tools_survive(run)  # a wrong type anywhere under Mallory's prefix, read mid-round
    m.delete(k.joined(MALLORY))
    m.set(k.joined(MALLORY), "not a hash")  # her join record, replaced after admission
    m.rpush(k.inbox, MALLORY)
    assert made == {"string", "list", "hash", "stream"}
    out = _check(run, "every client key x every Redis type")
    assert out["outcomes"]["malformed"] >= 1 and out["outcomes"]["accepted"] == 0


def test_sequence_numbers_that_are_not_numbers(arena: Arena) -> None:
    run = Run(arena, "adv-seq")
    assert run.mallory_joins() == "joined"
    _round_open(run, 1)
    k, m = RunKeys(run.run_id), run.mallory
    payload, _ = run.mallory_update(1, 10)
    for seq in ("abc", "99999999999999999999999", "-1", "1e3", ""):
        m.delete(k.update(MALLORY, 1))
        m.set(k.update_body(MALLORY, 1), payload)
        m.hset(k.update(MALLORY, 1), mapping={"seq": seq})
        m.rpush(k.inbox, MALLORY)
    out = _check(run, "sequence numbers that are not numbers")
    assert out["outcomes"]["accepted"] == 0 and out["outcomes"]["malformed"] >= 1


def test_values_far_over_the_caps_are_never_read(arena: Arena) -> None:
    run = Run(arena, "adv-huge", round_timeout=6)  # 100 MiB written in round 1
    assert run.mallory_joins() == "joined"
    _round_open(run, 1)
    k, m = RunKeys(run.run_id), run.mallory
    huge = b"\0" * (20 << 20)  # the run's cap is 4 MiB
    m.set(k.update_body(MALLORY, 1), huge)
    m.set(k.update_staged(MALLORY), huge)
    m.hset(k.update(MALLORY, 1), mapping={"seq": "1"})
    m.hset(k.joined(MALLORY), "stats", huge)
    m.set(k.evaluation(MALLORY), huge)
    m.set(k.alive(MALLORY), huge)
    m.rpush(k.client_refused(MALLORY), huge)
    m.rpush(k.inbox, MALLORY)
    out = _check(run, "20 MiB values in every key")
    assert out["outcomes"]["too_large"] == 1 and out["outcomes"]["accepted"] == 0
    assert run.bytes_read[0] < 20 << 20


def test_ten_thousand_wake_ups_cost_no_reads(arena: Arena) -> None:
    run = Run(arena, "adv-wake")
    assert run.mallory_joins() == "joined"
    _round_open(run, 1)
    k, m = RunKeys(run.run_id), run.mallory
    payload, mine = run.mallory_update(1, 10)
    assert run.m.push_update(MALLORY, 1, payload, 4 << 20) == "ok"
    run.wait(lambda: any(j["client"] == MALLORY for j in run.store.judged()), "Mallory's update to be judged")
    pipe = m.pipeline(transaction=False)
    for i in range(10_000):
        pipe.rpush(k.inbox, MALLORY if i % 2 else "site-a")
    pipe.execute()
    out = _check(run, "10,000 wake-ups", extra=lambda rnd: [(mine, 10)] if rnd == 1 else [])
    assert out["outcomes"] == Counter({"accepted": 1})


def test_a_member_flood_cannot_keep_honest_clients_out(arena: Arena) -> None:
    run = Run(arena, "adv-flood", clients=2)
    k, m = RunKeys(run.run_id), run.mallory
    with pytest.raises(NOPERM):
        m.sadd(k.members, *[f"junk-{i}" for i in range(1000)])
    m.rpush(k.inbox, *[f"junk-{i}" for i in range(1000)], "<script>", "x" * 200, "site-a", "site-b")
    out = _check(run, "member flood (1,000 ids)")
    assert sorted(run.store.member_ids()) == sorted(HONEST)
    assert out["outcomes"].get("accepted", 0) == 0
    assert run.mallory_joins() in ("run_full", "run_finished")  # no place left for her either


def test_a_flood_of_waiting_join_requests_costs_bounded_looks(arena: Arena) -> None:
    """Her ACL user may SADD to the run's waiting join requests: junk ids, ids of others, an entry
    of 1 MiB. The aggregator looks at a bounded sample at a time; the oversized entry is dropped in
    Redis, never read; the honest clients and she (asking properly) are admitted."""
    run = Run(arena, "adv-joins")
    k, m = RunKeys(run.run_id), run.mallory
    with pytest.raises(NOPERM):
        m.srem(k.joins, *HONEST)
    m.sadd(k.joins, "x" * (1 << 20), "<script>", *HONEST)
    run.wait(lambda: not arena.agg.exists(k.joins), "the aggregator to take up the waiting requests")
    m.sadd(k.joins, *[f"junk-{i}" for i in range(2000)])
    assert run.mallory_joins() == "joined"
    out = _check(run, "2,000 waiting join requests")  # its bound leaves no room for the 1 MiB entry
    assert sorted(run.store.member_ids()) == sorted([*HONEST, MALLORY])
    assert out["outcomes"].get("accepted", 0) == 0  # she joined and pushed nothing


def test_count_inflation_refused_above_the_provisioned_limit(arena: Arena, tmp_path) -> None:
    private, registry = new_keys([*HONEST, MALLORY], max_examples=1000)
    registry["limits"][MALLORY] = {"max_examples": 50}  # type: ignore[index]
    (tmp_path / "client-keys.json").write_text(json.dumps(registry))
    signers = {cid: _signer(tmp_path, cid, pem) for cid, pem in private.items()}
    run = Run(arena, "adv-limit", signers=signers, client_keys=str(tmp_path / "client-keys.json"))
    assert run.mallory_joins(rows=10 ** 9) == "joined"
    _round_open(run, 1)
    payload, _ = run.mallory_update(1, 10 ** 9, signer=signers[MALLORY])
    assert run.m.push_update(MALLORY, 1, payload, 4 << 20) == "ok"
    out = _check(run, "claims 10^9 rows (limit 50)")
    assert out["outcomes"] == Counter({"bad_num_examples": 1})


def _signer(tmp_path, cid: str, pem: bytes) -> Signer:
    path = tmp_path / f"{cid}.key"
    path.write_bytes(pem)
    return Signer.from_file(path)


def test_count_inflation_capped_by_max_client_share(arena: Arena) -> None:
    run = Run(arena, "adv-share", spec_extra={"max_client_share": 0.5})
    assert run.mallory_joins(rows=10 ** 9) == "joined"
    tensors: dict[int, list[np.ndarray]] = {}
    for rnd in (1, 2):
        _round_open(run, rnd)
        payload, tensors[rnd] = run.mallory_update(rnd, 10 ** 9, scale=3.0)
        assert run.m.push_update(MALLORY, rnd, payload, 4 << 20) == "ok"
    honest = sum(HONEST.values())  # a share of 0.5: Mallory weighs what the others weigh together
    out = _check(run, "claims 10^9 rows (share cap 0.5)", extra=lambda rnd: [(tensors[rnd], honest)],
                 refold_allowance=2 * (2 << 20) * run.spec.rounds)
    for m in out["metrics"]:
        assert m["capped_weights"] == {MALLORY: honest}


def test_the_audit_trail_is_out_of_reach(arena: Arena) -> None:
    run = Run(arena, "adv-audit")
    assert run.mallory_joins() == "joined"
    _round_open(run, 1)
    k, m = RunKeys(run.run_id), run.mallory
    payload, mine = run.mallory_update(1, 10)
    assert run.m.push_update(MALLORY, 1, payload, 4 << 20) == "ok"
    m.delete(k.client_pushes(MALLORY))  # her own log: hers to forge, and nobody audits with it
    m.xadd(k.client_pushes(MALLORY), {"client": "site-a", "round": 1, "digest": "forged", "outcome": "ok"})
    for attempt in (lambda: m.xadd(k.judged, {"client": "site-a", "outcome": "accepted"}),
                    lambda: m.delete(k.judged), lambda: m.xrange(k.judged), lambda: m.rpush(k.refused, "{}"),
                    lambda: m.lpush(k.metrics, "{}")):
        with pytest.raises(NOPERM):
            attempt()
    out = _check(run, "audit tampering", extra=lambda rnd: [(mine, 10)] if rnd == 1 else [])
    accepted = {(j["round"], j["client"]): j["digest"] for j in out["judged"] if j["outcome"] == "accepted"}
    for m_ in out["metrics"]:
        for cid, info in m_["clients"].items():
            assert accepted[(str(m_["round"]), cid)] == info["digest"]


def test_re_pushing_is_capped(arena: Arena) -> None:
    # A fourth member that is alive but never pushes keeps the round open until its deadline:
    # time for every push.
    run = Run(arena, "adv-repush", clients=4, rounds=1, round_timeout=6)
    idle = RunStore(arena.agg, run.run_id)
    beat = heartbeat.client_heartbeat(arena.agg, run.run_id, "idle", ttl=30).start()
    x, _ = load_shard(run.spec.data, 1, 2)
    joined = idle.join_and_wait("idle", {"shard": 1, "own_data": True, "rows": 10}, feature_stats(x).to_dict())
    assert joined == "joined"
    assert run.mallory_joins() == "joined"
    _round_open(run, 1)
    pushes = 0
    for i in range(8):
        payload, _ = run.mallory_update(1, 10, scale=1.0 + i)
        if run.m.push_update(MALLORY, 1, payload, 4 << 20) != "ok":
            break
        pushes += 1
        run.wait(lambda i=i: sum(j["client"] == MALLORY for j in run.store.judged()) >= min(i + 1, 5),
                 f"Mallory's push {i + 1} to be judged")
    assert pushes == 8
    # Each version read replaces the last and rebuilds the sum: at most FEDQ_MAX_PUSHES_PER_ROUND of them.
    out = _check(run, "8 re-pushes in a round", refold_allowance=4 * 3 * (2 << 20))
    beat.stop()
    assert out["metrics"][0]["missing"] == {"idle": "no update by the deadline"}
    versions_read = sum(1 for j in out["judged"] if j["client"] == MALLORY and int(j["bytes"]) > 0)
    assert versions_read == run.settings.max_pushes_per_round
    assert out["outcomes"]["too_many_pushes"] == 1


def test_a_user_confined_to_another_run_cannot_touch_this_one(arena: Arena) -> None:
    run = Run(arena, "adv-confined", clients=2)  # the honest two fill it: training opens without a join deadline
    k = RunKeys(run.run_id)
    confined = arena.connect(CONFINED)  # fedq acl --run elsewhere: her rules name no key of this run
    _round_open(run, 1)
    payload, _ = run.mallory_update(1, 10)
    attempts = {
        "join": lambda: run.m.__class__(confined, run.run_id).join(CONFINED, {"shard": 0}, {"count": [1]}),
        "push": lambda: run.m.__class__(confined, run.run_id).push_update(CONFINED, 1, payload, 4 << 20),
        "wake the aggregator": lambda: confined.rpush(k.inbox, CONFINED),
        "read the global model": lambda: confined.get(k.global_model),
        "write under her prefix here": lambda: confined.set(k.alive(CONFINED), "1"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(NOPERM):
            attempt()
            pytest.fail(f"a user confined to another run could {what}")
    # Mallory (any run) is no member of this one: her pushes are refused at the door.
    assert run.m.push_update(MALLORY, 1, payload, 4 << 20) in ("unknown_client", "run_not_training")
    _check(run, "not a member / confined elsewhere")


def test_ids_that_are_no_ids_in_shared_structures(arena: Arena) -> None:
    """A party with raw write access (no ACLs) puts ids that cannot exist into the run index and
    a member set: every reader skips them."""
    r = arena.agg
    r.zadd("fedq:runs", {"<script>alert(1)</script>": 1, "a:b{c}": 2, "x" * 300: 3})
    try:
        ids = list_runs(r)
        assert all(i.startswith("adv-") for i in ids)
        assert newest_open_run(r, "site-a") is None or newest_open_run(r, "site-a").startswith("adv-")
        dash = arena.connect(acl.DASHBOARD_USER)
        overview = snapshot.runs_overview(dash)
        assert {x["run_id"] for x in overview["runs"]} <= set(ids)
        env = cli_env(arena.url(acl.DASHBOARD_USER))
        for args in (("status",), *(("status", "--run", i) for i in ids[:3])):
            done = subprocess.run(fedq_cmd(*args), env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
    finally:
        r.zrem("fedq:runs", "<script>alert(1)</script>", "a:b{c}", "x" * 300)
    assert os.environ.get("FEDQ_REDIS_URL", "") != arena.url(acl.DASHBOARD_USER)


def test_buffered_stale_updates_pushed_and_written_around_the_push(arena: Arena) -> None:
    """A buffered run (two updates a version, no staleness allowed): Mallory, as her own ACL user,
    pushes for the version just behind with a window of her own choosing, writes her update key
    around the push step, and pushes for a version not open. None of it counts; the honest
    clients' updates make every version."""
    run = Run(arena, "adv-buffered", rounds=8, spec_extra={"aggregation": "buffered", "buffer_size": 2,
                                                           "max_staleness": 0, "min_clients": None})
    assert run.mallory_joins() == "joined"
    run.wait(lambda: run.store.committed_round() >= 1, "version 1 to commit")
    k = RunKeys(run.run_id)

    def stale_judged() -> bool:
        return any(j["client"] == MALLORY and j["outcome"] == "stale" for j in run.store.judged())

    for _ in range(6):  # the honest clients move versions on fast: aim at the one just behind, again
        behind = max(1, run.store.committed_round())
        payload, _ = run.mallory_update(behind, 50)
        assert run.m.push_update(MALLORY, behind, payload, run.settings.max_update_bytes, window=50) in ("ok", "stale")
        run.mallory.set(k.update_body(MALLORY, behind), payload)
        run.mallory.hset(k.update(MALLORY, behind), "parts", "")
        run.mallory.hincrby(k.update(MALLORY, behind), "seq", 1)  # another version, without the push step
        run.mallory.rpush(k.inbox, MALLORY)
        try:
            run.wait(stale_judged, "her stale update to be judged", timeout=3)
            break
        except AssertionError:
            continue
    payload, _ = run.mallory_update(1, 50)
    assert run.m.push_update(MALLORY, 99, payload, run.settings.max_update_bytes, window=50) == "round_not_open"
    out = _check(run, "buffered: stale, around the push")
    assert out["outcomes"]["stale"] >= 1 and out["outcomes"]["accepted"] == 0
    assert all(m["staleness_max"] == 0 for m in out["metrics"])


def test_buffered_forged_base_versions_and_re_pushes_of_one_base(arena: Arena) -> None:
    """A buffered run whose staleness window is wide open (50 versions): Mallory re-pushes for base
    version 0 again and again, each update's envelope claiming a base version from far in the
    future, pushes for that future version itself, for version -1, and writes a key for the
    future version around the push step. Nothing of hers counts, the aggregator reads at most
    FEDQ_MAX_PUSHES_PER_ROUND versions of her key, and the honest clients make every version."""
    run = Run(arena, "adv-buffered-forged", rounds=12, round_timeout=20,  # room for her pushes under load
              spec_extra={"aggregation": "buffered", "buffer_size": 2, "max_staleness": 50, "min_clients": None})
    assert run.mallory_joins() == "joined"
    run.wait(lambda: run.store.committed_round() >= 1, "version 1 to commit")
    future = 10**12
    payload, _ = run.mallory_update(future, 50)  # tagged with a base version from the future
    cap = run.settings.max_update_bytes
    for i in range(run.settings.max_pushes_per_round + 3):
        assert run.m.push_update(MALLORY, 1, payload, cap, window=50) == "ok"  # base 0: inside the window
        run.wait(lambda i=i: sum(j["client"] == MALLORY for j in run.store.judged())
                 >= min(i + 1, run.settings.max_pushes_per_round + 1), f"Mallory's push {i + 1} to be judged")
    assert run.m.push_update(MALLORY, future, payload, cap, window=50) == "round_not_open"
    assert run.m.push_update(MALLORY, -1, payload, cap, window=50) == "round_closed"
    k = RunKeys(run.run_id)
    run.mallory.set(k.update_body(MALLORY, future), payload)
    run.mallory.hset(k.update(MALLORY, future), mapping={"parts": "", "seq": "1"})
    run.mallory.rpush(k.inbox, MALLORY)
    out = _check(run, "buffered: forged bases, re-pushes")
    assert out["outcomes"]["accepted"] == 0 and out["outcomes"]["too_many_pushes"] == 1
    versions_read = sum(1 for j in out["judged"] if j["client"] == MALLORY and int(j["bytes"]) > 0)
    assert versions_read == run.settings.max_pushes_per_round
    assert {j["round"] for j in out["judged"] if j["client"] == MALLORY} == {"1"}  # the future key: never read
    assert all(m["staleness_max"] == 0 and MALLORY not in m["clients"] for m in out["metrics"])
