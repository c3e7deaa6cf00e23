"""One real federation watched from outside: the aggregator's /metrics (parsed with
prometheus-client's own parser) must count what the run did, and every process must keep a
heartbeat while it works.

The run: an aggregator worker started with --metrics-port, two `fedq client` processes (training
with FakeTrainer, support.fake_client: what is counted is the protocol, not the learning), and a
third client (in this process, through the real client loop) whose training yields NaN weights,
so that the aggregator refuses its update every round with reason ``non_finite``.

These checks need the counting calls of the aggregator (fedq/roles/collecting.py, committing.py,
judging.py) and the client heartbeat in
fedq/roles/client.py (see fedq/roles/metrics.py and fedq/protocol/heartbeat.py for the calls).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from support.checks import samples, value
from support.dashboard import http_get
from support.fake_client import fake_client_cmd, fake_client_env
from support.procs import Proc, cli_env
from support.redis import free_port
from support.trainer import FakeTrainer, nan_step
from support.wait import wait_until

from fedq.learning.spec import RunSpec
from fedq.protocol import heartbeat, messages
from fedq.protocol.store import RunStore
from fedq.roles.client import Client
from fedq.roles.jobs import submit_run
from fedq.settings import Settings

pytestmark = pytest.mark.slow

RUN = "metered"
ROUNDS = 2


@pytest.fixture(scope="module")
def federation(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Run the federation once; hand the tests what was seen during it and /metrics after it."""
    url = redis_server.url
    r = redis.Redis.from_url(url)
    r.flushall()
    logs = tmp_path_factory.mktemp("metered")
    env = cli_env(url)
    env["FEDQ_TF_THREADS"] = "1"
    port = free_port()
    procs = [Proc("aggregator", ["aggregator", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"], env, logs)]
    settings = Settings.from_env({"FEDQ_REDIS_URL": url})
    submit_run(r, settings, RunSpec(clients=3, rounds=ROUNDS, local_epochs=1, run_id=RUN))
    procs += [Proc(f"client-{k}", fake_client_cmd("client", "--shard", str(k), "--run", RUN, "--once"),
                   fake_client_env(env), logs, raw=True) for k in range(2)]
    store = RunStore(r, RUN)
    stop = threading.Event()
    bad = Client(redis.Redis.from_url(url), settings, 2, run_id=RUN, client_id="client-bad", stop=stop,
                 trainer_factory=FakeTrainer.factory(nan_step, seconds=0.2,  # NaN weights: refused
                                                   names=lambda: messages.decode_global(store.global_payload(),
                                                                                        RUN)[1]))
    bad_errors: list[BaseException] = []

    def run_bad() -> None:
        try:
            bad.serve(once=True)
        except BaseException as exc:  # reported by the tests, not lost in the thread
            bad_errors.append(exc)

    thread = threading.Thread(target=run_bad, daemon=True)
    thread.start()
    seen: dict[str, Any] = {"clients": set(), "aggregators": {}, "clients_alive": set()}
    scrape = functools.partial(http_get, f"http://127.0.0.1:{port}/metrics")
    try:
        deadline = time.monotonic() + 240
        while store.state().get("status") not in ("finished", "failed") and time.monotonic() < deadline:
            if store.state().get("phase") == "train":
                seen["clients"] |= set(heartbeat.alive_clients(r, RUN))
            seen["aggregators"].update(heartbeat.alive_aggregators(r))
            with contextlib.suppress(OSError):  # the server may not listen yet
                now = samples(scrape()[1].decode())
                seen["clients_alive"].add(value(now, "fedq_clients_alive"))
                seen.setdefault("run_round", set()).add(value(now, "fedq_run_round", run=RUN, strategy="fedavg"))
                seen.setdefault("run_expected", set()).add(
                    value(now, "fedq_run_clients_expected", run=RUN, strategy="fedavg"))
            time.sleep(0.2)
        thread.join(timeout=60)
        for p in procs[1:]:
            assert p.wait(60) == 0, p.text()[-3000:]
        # The run's gauges drop once its driver is done (shortly after the run's state says so).
        with contextlib.suppress(AssertionError):
            wait_until(lambda: value(samples(scrape()[1].decode()), "fedq_clients_alive") == 0,
                       "fedq_clients_alive to drop to 0", timeout=20, ignore=(Exception,))
        status, body, _ = scrape()
        seen["after"] = set(heartbeat.alive_clients(r, RUN))
        yield {"r": r, "store": store, "seen": seen, "metrics_status": status, "metrics": body.decode(),
               "bad_errors": bad_errors, "aggregator": procs[0]}
    finally:
        stop.set()
        for p in procs:
            p.stop()


def test_the_run_finished_with_one_refusal_per_round(federation: dict[str, Any]) -> None:
    store = federation["store"]
    assert store.state()["status"] == "finished", federation["aggregator"].text()[-3000:]
    assert not federation["bad_errors"], federation["bad_errors"]
    assert [(x["client"], x["reason"]) for x in store.refused()] == [("client-bad", "non_finite")] * ROUNDS


def test_metrics_endpoint_counts_match_the_run(federation: dict[str, Any]) -> None:
    assert federation["metrics_status"] == 200
    p = samples(federation["metrics"])  # prometheus-client's own parser
    store = federation["store"]
    rounds = store.metrics()
    refused = Counter(x["reason"] for x in store.refused() if x.get("stage") == "aggregate")
    assert value(p, "fedq_rounds_completed_total") == len(rounds) == ROUNDS
    assert value(p, "fedq_updates_accepted_total") == sum(m["num_updates"] for m in rounds) == 2 * ROUNDS
    for reason, n in refused.items():
        assert value(p, "fedq_updates_refused_total", reason=reason) == n, reason
    assert sum(v for (name, _), v in p.items() if name == "fedq_updates_refused_total") == sum(refused.values())
    assert value(p, "fedq_round_duration_seconds_count") == ROUNDS
    assert value(p, "fedq_round_duration_seconds_sum") == pytest.approx(sum(m["seconds"] for m in rounds), rel=0.05)
    # Every update read was pushed once here, so the bytes read are the bytes the push log recorded.
    pushed = sum(int(x["bytes"]) for x in store.pushes() if x.get("outcome") == "ok")
    assert value(p, "fedq_bytes_received_total") == pushed > 0
    assert 3 in federation["seen"]["clients_alive"], "while the run trained, its 3 clients were alive"
    assert value(p, "fedq_clients_alive") == 0, "after the run ended, no client of it is alive"


def test_clients_and_the_aggregator_kept_heartbeats(federation: dict[str, Any]) -> None:
    seen = federation["seen"]
    assert seen["clients"] == {"client-0", "client-1", "client-bad"}, "every training client keeps a heartbeat"
    assert seen["after"] == set(), "clients that left cleanly removed their heartbeats"
    (agg,) = seen["aggregators"].values()
    assert agg["role"] == "aggregator" and agg["pid"] == federation["aggregator"].proc.pid


def test_per_run_gauges_while_the_worker_drives_the_run_and_none_after(federation: dict[str, Any]) -> None:
    seen = federation["seen"]
    assert {0.0, 1.0} & seen["run_round"], seen["run_round"]  # served while the run trained
    assert 3.0 in seen["run_expected"]
    after = samples(federation["metrics"])
    assert not [k for k in after if k[0].startswith("fedq_run_")], "a finished run's series must end"
    assert [k for k in after if k[0] == "fedq_build_info"] and value(after, "process_resident_memory_bytes")
