"""Buffered aggregation (FedBuff) under faults: real processes, a real Redis of the scenario's own.

The aggregator is SIGKILLed while its buffer holds folded updates that no committed version holds
yet (they live in its memory only); a second aggregator takes the run over, rebuilds the buffer
from Redis and finishes the run. Every version must then hold each update exactly once, none lost,
and the dead driver's commit must be refused by the lease (fencing).
"""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import dataclass

import pytest
from harness import Audit, Federation

from fedq.protocol.fencing import LeaseLost, VersionCommit
from fedq.protocol.store import RunStore

pytestmark = pytest.mark.slow

K = 3  # updates a version: with three clients, one slow, a buffer of two is "mid-buffer" for seconds
LIMIT = 1  # --max-staleness


@dataclass
class Pushes:
    """What the clients' own push log says: the digests pushed (outcome ok) per (round, client)."""

    ok: dict[tuple[int, str], set[str]]

    @classmethod
    def read(cls, store: RunStore) -> Pushes:
        ok: dict[tuple[int, str], set[str]] = {}
        for p in store.pushes():
            if p["outcome"] == "ok":
                ok.setdefault((int(p["round"]), p["client"]), set()).add(p["digest"])
        return cls(ok)


def audit_versions(fed: Federation) -> Audit:
    """Exactly-once accounting of a buffered run: each version committed once, each (client, base
    version) folded in at most one version and with a digest the client pushed and the aggregator
    accepted, and every push for a base version that left the window before the end either folded
    or refused with a reason."""
    store = fed.store
    metrics = store.metrics()
    assert [m["version"] for m in metrics] == list(range(1, len(metrics) + 1)), "a version committed twice"
    pushes = Pushes.read(store)
    accepted = {(int(j["round"]), j["client"], j["digest"]) for j in store.judged() if j["outcome"] == "accepted"}
    refused = {(int(x["round"]), x["client"]) for x in store.refused()}
    folded: Counter[tuple[int, str]] = Counter()
    double = 0
    for m in metrics:
        if len(m["updates"]) != m["num_updates"] or sum(u["num_examples"] for u in m["updates"]) != m["num_examples"]:
            double += 1
        for u in m["updates"]:
            key = (u["base"] + 1, u["client"])
            folded[key] += 1
            if u["digest"] not in pushes.ok.get(key, set()) or (*key, u["digest"]) not in accepted:
                double += 1  # counted something the client did not push, or the aggregator did not accept
    double += sum(n - 1 for n in folded.values() if n > 1)
    last = len(metrics)
    # Pushes for round r (trained from version r - 1) are taken while fewer than r + LIMIT versions
    # are committed: those of rounds up to last - LIMIT - 1 have had a later version judge them.
    settled = {key for key in pushes.ok if key[0] <= last - LIMIT - 1}
    assert settled or last <= LIMIT + 1, "no round's pushes were settled: the lost count would check nothing"
    lost = sum(1 for key in settled if key not in folded and key not in refused)
    return Audit(last, sum(folded.values()), len(store.refused()), lost, double)


def _in_buffer(fed: Federation, round_no: int) -> int:
    """Updates for round_no the aggregator accepted (judged) while no version holds them yet."""
    store = fed.store
    consumed = store.consumed(round_no)
    return len({j["client"] for j in store.judged()
                if int(j["round"]) == round_no and j["outcome"] == "accepted" and j["client"] not in consumed})


def test_aggregator_sigkill_mid_buffer_then_a_new_aggregator(federation) -> None:
    fed = federation(clients=3, rounds=3, run_id="buf-kill", submit=(
        "--aggregation", "buffered", "--buffer-size", str(K), "--max-staleness", str(LIMIT)))
    fed.aggregator("agg-a")
    fed.client(0)
    fed.client(1)
    fed.client(2, env={**fed.env, "FEDQ_TEST_TRAIN_SECONDS": "2"})  # shard 2: 6 s a version
    fed.wait(lambda: _in_buffer(fed, 1) == 2, "two updates folded into version 1's buffer")
    assert fed.store.committed_round() == 0  # mid-buffer: folded in agg-a's memory, committed nowhere
    old = fed.store.state()["driver"]
    fed.signal("agg-a", signal.SIGKILL)
    fed.aggregator("agg-b")
    fed.wait(lambda: fed.store.state().get("driver") not in (None, old), "agg-b to take the run over")

    # Fencing: whatever the dead driver would still commit is refused, and changes nothing.
    late = RunStore(fed.r, fed.run_id)
    late.driver = old
    before = len(late.metrics())
    with pytest.raises(LeaseLost):
        late.commit_version(VersionCommit(version=late.committed_round() + 1, global_payload=b"late",
                                          metrics={"version": -1}, folded={("client-0", 1): "1"}))
    assert len(late.metrics()) == before and late.global_payload() != b"late"

    state = fed.wait_end()
    assert state["status"] == "finished", state
    audit = audit_versions(fed)
    fed.record("buffered: aggregator SIGKILL mid-buffer", audit)
    assert audit.rounds == 3 and audit.lost == 0 and audit.double_counted == 0
    first = fed.store.metrics()[0]
    assert sorted(u["client"] for u in first["updates"]) == ["client-0", "client-1", "client-2"]
    # Each push was accepted once per driver that judged it: the two in the killed buffer were
    # judged again by agg-b (its buffer is rebuilt from Redis), the rest once.
    judged = Counter((j["client"], j["round"], j["seq"]) for j in fed.store.judged() if j["outcome"] == "accepted")
    assert {k: n for k, n in judged.items() if n > 1} == {("client-0", "1", "1"): 2, ("client-1", "1", "1"): 2}
    assert not any(x["stage"] == "aggregate" for x in fed.store.refused())
    for name in ("client-0", "client-1", "client-2"):
        assert fed.exit_code(name) == 0, fed.log(name)
