"""The round protocol against a real Redis: the aggregator in-process, clients as direct pushes.

Each round two clients push valid updates and a third pushes one kind of bad input; the
round must complete with the valid ones, record the refusal, and commit their exact FedAvg.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from support.federation import Federation, noisy
from support.wait import wait_until

from fedq.learning.aggregate import fedavg

N_GOOD = (100, 300)  # sample counts of the two valid clients: very unequal on purpose


def _bad_cases() -> list[tuple[str, Callable[[Federation, int, list[str], list[np.ndarray]], bytes]]]:
    def shape(h, rn, names, g):
        return h.update("c2", rn, 50, [g[0][..., :1], *g[1:]], names)

    def dtype(h, rn, names, g):
        return h.update("c2", rn, 50, [t.astype(np.float64) for t in g], names)

    def nan(h, rn, names, g):
        bad = [t.copy() for t in g]
        bad[-1].flat[0] = np.nan
        return h.update("c2", rn, 50, bad, names)

    def inf(h, rn, names, g):
        bad = [t.copy() for t in g]
        bad[0].flat[-1] = np.inf
        return h.update("c2", rn, 50, bad, names)

    return [
        ("undecodable", lambda h, rn, names, g: b"\x93not an envelope\xff"),
        ("undecodable", lambda h, rn, names, g: h.update("c2", rn, 50, g, names)[:-7]),  # truncated
        ("wrong_shape", shape),
        ("wrong_dtype", dtype),
        ("non_finite", nan),
        ("non_finite", inf),
        ("bad_num_examples", lambda h, rn, names, g: h.update("c2", rn, 0, g, names)),
        ("bad_num_examples", lambda h, rn, names, g: h.update("c2", rn, 1, g, names, num_examples=-5)),
        ("wrong_run", lambda h, rn, names, g: h.update("c2", rn, 50, g, names, run="another-run")),
        ("wrong_round", lambda h, rn, names, g: h.update("c2", rn, 50, g, names, round=rn + 1)),
        ("wrong_client", lambda h, rn, names, g: h.update("c2", rn, 50, g, names, client="c0")),
    ]


@pytest.mark.slow
def test_bad_updates_are_refused_recorded_and_the_round_completes(harness_factory) -> None:
    cases = _bad_cases()
    h = harness_factory(len(cases), "t-refuse")
    for round_no, (reason, make_bad) in enumerate(cases, start=1):
        g_round, names, g = h.global_model()
        assert g_round == round_no - 1
        good = [noisy(g, 10 * round_no + i) for i in range(2)]
        assert h.push("c2", round_no, make_bad(h, round_no, names, g)) == "ok"  # stored; judged by the aggregator
        for i, cid in enumerate(("c0", "c1")):
            assert h.push(cid, round_no, h.update(cid, round_no, N_GOOD[i], good[i], names)) == "ok"
        h.wait_round(round_no)

        committed, _, new = h.global_model()
        assert committed == round_no
        expected = fedavg([(good[0], N_GOOD[0]), (good[1], N_GOOD[1])])
        for got, want in zip(new, expected):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        metrics = h.store.metrics()[-1]
        assert metrics["num_updates"] == 2 and metrics["num_examples"] == sum(N_GOOD)
        assert sorted(metrics["clients"]) == ["c0", "c1"]
        assert metrics["refused"] == 1
        last = h.store.refused()[-1]
        assert (last["client"], last["round"], last["reason"]) == ("c2", round_no, reason), last
        assert last["detail"]
    h.thread.join(timeout=30)
    assert h.store.state()["status"] == "finished"
    assert len(h.store.refused()) == len(cases)


def test_push_time_refusals_are_recorded(harness_factory) -> None:
    h = harness_factory(2, "t-push")
    _, names, g = h.global_model()
    assert h.push("c0", 2, h.update("c0", 2, 10, g, names)) == "round_not_open"
    assert h.push("stranger", 1, h.update("stranger", 1, 10, g, names)) == "unknown_client"
    assert h.push("c0", 1, b"x" * 100) == "ok"
    assert h.store.push_update("c1", 1, b"y" * 100, max_bytes=10) == "too_large"
    for cid in ("c0", "c1", "c2"):
        assert h.push(cid, 1, h.update(cid, 1, 10, g, names)) == "ok"
    h.wait_round(1)
    assert h.push("c1", 1, h.update("c1", 1, 10, g, names)) == "round_closed"
    refused = h.store.refused()
    at_push = [(x["client"], x["reason"]) for x in refused if x["stage"] == "push"]
    assert at_push == [("c0", "round_not_open"), ("stranger", "unknown_client"),
                       ("c1", "too_large"), ("c1", "round_closed")]
    # c0's garbage payload may have been judged before its valid re-push replaced it; either
    # way it is refused, and the replacement counts.
    assert all((x["client"], x["reason"]) == ("c0", "undecodable") for x in refused if x["stage"] == "aggregate")
    assert h.store.metrics()[0]["num_updates"] == 3


def test_repush_replaces_and_duplicates_never_double_count(harness_factory) -> None:
    h = harness_factory(1, "t-repush")
    _, names, g = h.global_model()
    first, second, other, third = (noisy(g, s) for s in (1, 2, 3, 4))
    assert h.push("c0", 1, h.update("c0", 1, 100, first, names)) == "ok"
    wait_until(lambda: h.store.r.llen(h.store.k.inbox) == 0, "the aggregator to fold c0's first update")
    assert h.push("c0", 1, h.update("c0", 1, 200, second, names)) == "ok"  # replaces, new count too
    same = h.update("c1", 1, 50, other, names)
    assert h.push("c1", 1, same) == "ok"
    assert h.push("c1", 1, same) == "ok"  # an identical re-push (a retry) must not count twice
    assert h.push("c2", 1, h.update("c2", 1, 25, third, names)) == "ok"
    h.wait_round(1)
    expected = fedavg([(second, 200), (other, 50), (third, 25)])
    _, _, new = h.global_model()
    for got, want in zip(new, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    m = h.store.metrics()[0]
    assert m["num_updates"] == 3 and m["num_examples"] == 275
    assert h.store.state()["status"] == "finished"
