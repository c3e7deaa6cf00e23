"""Prometheus metrics: fedq's own registry, /metrics parsed with prometheus-client's parser,
and values counted in forked children (as rq work horses do) served by the parent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import REGISTRY
from support.checks import samples, value
from support.dashboard import http_get
from support.redis import free_port
from support.wait import wait_until

from fedq.protocol.vocabulary import Refusal
from fedq.roles import metrics

REFUSAL_REASONS = tuple(Refusal)


def test_counts_in_a_registry_of_its_own() -> None:
    m = metrics.AggregatorMetrics()
    m.observe_update(True, None, 1000)
    m.observe_update(True, None, 1000)
    m.observe_update(False, "non_finite", 900)
    m.observe_update(False, "wrong_shape", 10)
    m.observe_update(False, "non_finite", 900)
    m.observe_round(0.3)
    m.observe_round(7.0)
    m.set_clients_alive(3)
    m.observe_staleness([0, 2, 7])
    p = samples(m.exposition().decode())
    assert value(p, "fedq_update_staleness_versions_count") == 3
    assert value(p, "fedq_update_staleness_versions_bucket", le="2.0") == 2
    assert value(p, "fedq_updates_accepted_total") == 2
    assert value(p, "fedq_updates_refused_total", reason="non_finite") == 2
    assert value(p, "fedq_updates_refused_total", reason="wrong_shape") == 1
    assert value(p, "fedq_bytes_received_total") == 3810
    assert value(p, "fedq_rounds_completed_total") == 2
    assert value(p, "fedq_round_duration_seconds_count") == 2
    assert value(p, "fedq_round_duration_seconds_sum") == 7.3
    assert value(p, "fedq_round_duration_seconds_bucket", le="0.5") == 1
    assert value(p, "fedq_round_duration_seconds_bucket", le="+Inf") == 2
    assert value(p, "fedq_clients_alive") == 3
    # Not in prometheus-client's global registry, and a second instance does not collide.
    assert REGISTRY.get_sample_value("fedq_updates_accepted_total") is None
    other = metrics.AggregatorMetrics()
    assert value(samples(other.exposition().decode()), "fedq_updates_accepted_total") == 0


def test_metrics_server_serves_the_module_counters() -> None:
    before = samples(metrics.default().exposition().decode())
    metrics.observe_update(True, None, 500)
    metrics.observe_update(False, "undecodable", 20)
    metrics.observe_round(1.5)
    metrics.set_clients_alive(2)
    server = metrics.start_metrics_server(0, "127.0.0.1")
    try:
        status, body, headers = http_get(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.close()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    p = samples(body.decode())

    def grew(name: str, **labels: str) -> float:
        return (value(p, name, **labels) or 0) - (value(before, name, **labels) or 0)

    assert grew("fedq_updates_accepted_total") == 1
    assert grew("fedq_updates_refused_total", reason="undecodable") == 1
    assert grew("fedq_bytes_received_total") == 520
    assert grew("fedq_rounds_completed_total") == 1
    assert value(p, "fedq_clients_alive") == 2


FORKING_SERVER = """
import os, sys, time
from fedq.roles import metrics
metrics.prepare_multiprocess()
server = metrics.start_metrics_server(int(sys.argv[1]), "127.0.0.1")
for k in range(2):  # two work horses, one after the other, as an rq worker runs two runs
    pid = os.fork()
    if pid == 0:
        metrics.observe_update(True, None, 100)
        metrics.observe_update(False, "non_finite", 7)
        metrics.observe_round(0.5 + k)
        metrics.set_clients_alive(3 + k)
        os._exit(0)
    os.waitpid(pid, 0)
print("ready", flush=True)
time.sleep(60)
"""


def test_values_counted_in_forked_children_reach_the_parents_metrics(tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "forking_server.py"
    script.write_text(textwrap.dedent(FORKING_SERVER))
    # A directory of the test's own: the killed server cannot clean up a temporary one.
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "multiproc"))
    (tmp_path / "multiproc").mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        _status, body, _ = wait_until(lambda: http_get(f"http://127.0.0.1:{port}/metrics"), "/metrics", timeout=20,
                                      ignore=(Exception,))
        p = samples(body.decode())
        assert value(p, "fedq_updates_accepted_total") == 2
        assert value(p, "fedq_updates_refused_total", reason="non_finite") == 2
        assert value(p, "fedq_bytes_received_total") == 214
        assert value(p, "fedq_rounds_completed_total") == 2
        assert value(p, "fedq_round_duration_seconds_sum") == 2.0
        assert value(p, "fedq_clients_alive") == 4  # the most recent value set
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_every_refusal_reason_exists_at_zero_before_any_refusal() -> None:
    p = samples(metrics.AggregatorMetrics().exposition().decode())
    for reason in REFUSAL_REASONS:
        assert value(p, "fedq_updates_refused_total", reason=reason) == 0, reason


def test_refusal_reasons_list_every_reason_fedq_raises() -> None:
    # The reasons are literals at the raise sites; the list the metrics start from must not miss one.
    raised = set()
    for path in Path(metrics.__file__).parents[1].rglob("*.py"):  # all of fedq/
        text = path.read_text()
        raised |= set(re.findall(r'UpdateRejected\(\s*"([a-z_]+)"', text))
        raised |= {Refusal[name].value for name in re.findall(r"UpdateRejected\(\s*Refusal\.([A-Z_]+)", text)}
    assert raised and raised <= set(REFUSAL_REASONS), sorted(raised - set(REFUSAL_REASONS))


IDLE_SERVER = """
import sys, time
from fedq.roles import metrics
metrics.prepare_multiprocess()
server = metrics.start_metrics_server(int(sys.argv[1]), "127.0.0.1")
print("ready", flush=True)
time.sleep(60)
"""


def test_metrics_of_a_worker_that_drove_nothing_yet_are_not_empty(tmp_path: Path) -> None:
    # An rq worker's server before its first work horse: every family is there, at 0.
    port = free_port()
    script = tmp_path / "idle_server.py"
    script.write_text(textwrap.dedent(IDLE_SERVER))
    (tmp_path / "multiproc").mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "multiproc"))
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        status, body, _ = wait_until(lambda: http_get(f"http://127.0.0.1:{port}/metrics"), "/metrics",
                                     timeout=20, ignore=(Exception,))
        p = samples(body.decode())
        assert status == 200
        assert value(p, "fedq_rounds_completed_total") == 0
        assert value(p, "fedq_updates_accepted_total") == 0
        assert value(p, "fedq_clients_alive") == 0
        assert value(p, "fedq_updates_refused_total", reason="non_finite") == 0
        # multiprocess mode keeps the serving process's own metrics and says which fedq it is
        assert value(p, "process_resident_memory_bytes") and value(p, "process_start_time_seconds")
        assert [k for k in p if k[0] == "fedq_build_info"]
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_run_gauges_build_info_and_process_metrics_for_running_runs_only(r, redis_url: str) -> None:
    import redis as redis_lib
    from support.dashboard import make_run

    from fedq.protocol import heartbeat
    from fedq.protocol.store import RunStore

    make_run(r, "gauged", clients=2, rounds=3, committed=1)
    make_run(r, "gauged-done", clients=2, rounds=1, committed=1)  # finished: never served
    driven = ["gauged", "gauged-done"]
    hb = heartbeat.client_heartbeat(r, "gauged", "client-0", ttl=30).start()
    server = metrics.start_metrics_server(0, "127.0.0.1", r=redis_lib.Redis.from_url(redis_url),
                                          runs=lambda: list(driven))
    try:
        p = samples(http_get(f"http://127.0.0.1:{server.port}/metrics")[1].decode())
        last = RunStore(r, "gauged").metrics()[-1]
        lv = {"run": "gauged", "strategy": "fedavg"}
        assert value(p, "fedq_run_round", **lv) == 1 and value(p, "fedq_run_rounds", **lv) == 3
        assert value(p, "fedq_run_last_test_accuracy", **lv) == last["test_accuracy"]
        assert value(p, "fedq_run_last_test_loss", **lv) == last["test_loss"]
        assert value(p, "fedq_run_clients_alive", **lv) == 1 and value(p, "fedq_run_clients_expected", **lv) == 2
        assert not [k for k in p if dict(k[1]).get("run") == "gauged-done"]
        (build,) = [dict(k[1]) for k in p if k[0] == "fedq_build_info"]
        assert build["version"] and build["python"]
        assert value(p, "process_resident_memory_bytes")
        driven.clear()  # the worker drives nothing now: the run's series are gone
        p = samples(http_get(f"http://127.0.0.1:{server.port}/metrics")[1].decode())
        assert not [k for k in p if k[0].startswith("fedq_run_")]
    finally:
        server.close()
        hb.stop()


def test_the_example_grafana_dashboard_uses_only_metrics_fedq_serves(r) -> None:
    import json

    from prometheus_client import generate_latest
    from support.dashboard import make_run

    make_run(r, "grafana-run", rounds=3, committed=1)
    text = generate_latest(metrics.served_registry(r, lambda: ["grafana-run"])).decode()
    served = {s[0] for s in samples(text)}
    board = json.loads((Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "fedq-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    used = {m for e in exprs for m in re.findall(r"\b(fedq_[a-z_]+|process_[a-z_]+)", e)}
    assert used and used <= served, used - served
    assert {"fedq_run_round", "fedq_run_last_test_accuracy", "fedq_run_clients_alive", "fedq_build_info"} <= used
