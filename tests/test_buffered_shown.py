"""What a buffered run shows of its model versions: the dashboard's API (staleness per version),
the per-run Prometheus gauges and `fedq status`, all read from the records a real aggregator
committed (in-process, against a real Redis; the initial model stored with the run, so no
TensorFlow), plus the dashboard's reading of hostile records."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import redis
from rich.console import Console
from support.checks import samples, value
from support.dashboard import http_get
from support.federation import Federation, noisy
from support.initial import store_initial
from support.wait import wait_until

from fedq.learning.spec import RunSpec
from fedq.ops.dashboard import snapshot
from fedq.ops.dashboard.versions import version_rows
from fedq.ops.view import status_renderable
from fedq.roles import metrics


def _push(h: Federation, cid: str, base: int, seed: int, n: int = 100) -> None:
    _, names, g = h.global_model()
    payload = h.update(cid, base + 1, n, noisy(g, seed), names)
    assert h.store.push_update(cid, base + 1, payload, h.settings.max_update_bytes, window=1) == "ok"


@pytest.mark.slow
def test_versions_and_their_staleness_in_the_dashboard_metrics_and_status(
        federation_factory: Callable[..., Federation], r: redis.Redis, redis_url: str) -> None:
    spec = RunSpec(clients=3, rounds=3, round_timeout=60, run_id="t-buffered-shown", central_eval=False,
                   aggregation="buffered", buffer_size=2, max_staleness=1)
    store_initial(r, "t-buffered-shown")
    h = federation_factory(spec, state_rows=False)
    _push(h, "c0", 0, 1)
    _push(h, "c1", 0, 2)
    h.wait_round(1)
    _push(h, "c2", 0, 3)  # trained from version 0, folded into version 2: one version stale
    wait_until(lambda: any(j["client"] == "c2" for j in h.store.judged()), "c2's update to be judged")
    _push(h, "c0", 1, 4)
    h.wait_round(2)

    rows = snapshot.run_detail(r, "t-buffered-shown")["versions"]
    assert rows == [
        {"version": 1, "num_updates": 2, "staleness_mean": 0.0, "staleness_max": 0, "staleness": {"0": 2},
         "bases": {"0": 2}, "clients": ["c0", "c1"]},
        {"version": 2, "num_updates": 2, "staleness_mean": 0.5, "staleness_max": 1, "staleness": {"0": 1, "1": 1},
         "bases": {"0": 1, "1": 1}, "clients": ["c0", "c2"]}]

    server = metrics.start_metrics_server(0, "127.0.0.1", r=redis.Redis.from_url(redis_url),
                                          runs=lambda: ["t-buffered-shown"])
    try:
        p = samples(http_get(f"http://127.0.0.1:{server.port}/metrics")[1].decode())
    finally:
        server.close()
    lv = {"run": "t-buffered-shown", "strategy": "fedavg"}
    assert value(p, "fedq_run_round", **lv) == 2
    assert value(p, "fedq_run_version_updates", **lv) == 2
    assert value(p, "fedq_run_version_staleness_mean", **lv) == 0.5
    assert value(p, "fedq_run_version_staleness_max", **lv) == 1

    out = io.StringIO()
    Console(file=out, width=160).print(status_renderable(r, "t-buffered-shown"))
    text = out.getvalue()
    assert "τ mean" in text and "τ max" in text, text  # fedq status: staleness beside each version
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()[:1].isdigit()}
    assert rows["1"][7:9] == ["0.0000", "0.0000"] and rows["2"][7:9] == ["0.5000", "1.0000"], text


def test_sync_rounds_have_no_versions_and_hostile_records_read_as_absent() -> None:
    sync = {"round": 1, "num_updates": 2, "clients": {"a": {}, "b": {}}}
    assert version_rows([sync]) == []
    hostile = [
        {"version": 1, "num_updates": "2", "staleness_mean": "x", "staleness_max": True, "updates": "none",
         "clients": ["a"]},
        {"version": 2, "num_updates": 1, "updates": [7, {"staleness": -0.5, "base": "1"}, {"staleness": 3, "base": 0}],
         "clients": {"z": 1, "a": 2}},
        "not a record",
    ]
    assert version_rows(hostile) == [  # type: ignore[arg-type]
        {"version": 1, "num_updates": None, "staleness_mean": None, "staleness_max": None, "staleness": {},
         "bases": {}, "clients": []},
        {"version": 2, "num_updates": 1, "staleness_mean": None, "staleness_max": None, "staleness": {"3": 1},
         "bases": {"0": 1}, "clients": ["a", "z"]}]
