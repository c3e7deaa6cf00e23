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

from fedq.roles import metrics
from fedq.errors import REFUSAL_REASONS
from support.checks import samples, value
from support.redis import free_port
from support.dashboard import http_get
from support.wait import wait_until


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
    p = samples(m.exposition().decode())
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
        status, body, _ = wait_until(lambda: http_get(f"http://127.0.0.1:{port}/metrics"), "/metrics", timeout=20, ignore=(Exception,))
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
    for path in (Path(metrics.__file__).parent).rglob("*.py"):
        raised |= set(re.findall(r'UpdateRejected\(\s*"([a-z_]+)"', path.read_text()))
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
        status, body, _ = wait_until(lambda: http_get(f"http://127.0.0.1:{port}/metrics"), "/metrics", timeout=20, ignore=(Exception,))
        p = samples(body.decode())
        assert status == 200
        assert value(p, "fedq_rounds_completed_total") == 0
        assert value(p, "fedq_updates_accepted_total") == 0
        assert value(p, "fedq_clients_alive") == 0
        assert value(p, "fedq_updates_refused_total", reason="non_finite") == 0
    finally:
        proc.kill()
        proc.wait(timeout=10)
