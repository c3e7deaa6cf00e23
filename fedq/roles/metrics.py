"""Prometheus metrics of the aggregator, served on ``/metrics`` (prometheus-client).

The aggregator counts with the module functions (``observe_update``, ``observe_round``,
``set_clients_alive``); ``start_metrics_server`` serves them. Metrics live in a registry
of fedq's own, never prometheus-client's global one, so tests and several instances in
one process do not collide.

An rq worker drives each run in a forked work horse, so the counting happens in a child
process while the server runs in the parent. ``prepare_multiprocess`` switches
prometheus-client to its multiprocess mode for that: every process writes its values to a
file in one directory and the parent's server adds them up. It must run before
prometheus-client is imported, which is why this module imports it lazily.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading
from typing import Any

from fedq.protocol.vocabulary import Refusal

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
NAMESPACE = "fedq"
ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STALENESS_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100, 1000)  # versions (buffered aggregation)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def prepare_multiprocess(directory: str | None = None) -> str:
    """Make values counted in forked children visible to this process's server; returns the directory.

    Uses PROMETHEUS_MULTIPROC_DIR when it is set already (then the caller owns the directory),
    else a fresh temporary directory removed when this process exits.
    """
    if os.environ.get(MULTIPROC_ENV):
        return os.environ[MULTIPROC_ENV]
    if "prometheus_client" in sys.modules:
        # prometheus-client decides per-process or multiprocess values when it is imported.
        raise RuntimeError("prepare_multiprocess must run before prometheus_client is imported")
    path = directory or tempfile.mkdtemp(prefix="fedq-metrics-")
    os.makedirs(path, exist_ok=True)
    os.environ[MULTIPROC_ENV] = path
    if directory is None:
        owner = os.getpid()

        def remove() -> None:
            # Forked work horses leave with os._exit (no atexit); the check is for other forks.
            if os.getpid() == owner:
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(remove)
    return path


class AggregatorMetrics:
    """The aggregator's metric families, registered in one registry."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        ns, reg = NAMESPACE, self.registry
        self.rounds_completed = Counter("rounds_completed", "Federated rounds committed.", namespace=ns, registry=reg)
        self.updates_accepted = Counter("updates_accepted", "Client updates validated and aggregated.",
                                        namespace=ns, registry=reg)
        self.updates_refused = Counter("updates_refused", "Client updates refused, by reason.", ["reason"],
                                       namespace=ns, registry=reg)
        for reason in Refusal:  # every reason exists, at 0, before its first refusal
            self.updates_refused.labels(reason=reason)
        self.round_duration = Histogram("round_duration_seconds", "Wall time of a committed round.",
                                        buckets=ROUND_BUCKETS, namespace=ns, registry=reg)
        self.bytes_received = Counter("bytes_received", "Bytes of client updates read by the aggregator.",
                                      namespace=ns, registry=reg)
        self.update_staleness = Histogram("update_staleness_versions", "Buffered aggregation: how many versions "
                                          "behind the newest each folded update was trained.",
                                          buckets=STALENESS_BUCKETS, namespace=ns, registry=reg)
        # mostrecent: with forked work horses, the value the latest one set (ignored otherwise).
        self.clients_alive = Gauge("clients_alive", "Clients of the current run with a live heartbeat.",
                                   multiprocess_mode="mostrecent", namespace=ns, registry=reg)

    def observe_update(self, accepted: bool, reason: str | None = None, nbytes: int = 0) -> None:
        """Count one update: accepted, or refused for reason; nbytes it weighed on the wire."""
        if accepted:
            self.updates_accepted.inc()
        else:
            self.updates_refused.labels(reason=reason or "unknown").inc()
        if nbytes > 0:
            self.bytes_received.inc(nbytes)

    def observe_round(self, seconds: float) -> None:
        """Count one committed round and its wall time."""
        self.rounds_completed.inc()
        self.round_duration.observe(max(0.0, float(seconds)))

    def set_clients_alive(self, n: int) -> None:
        self.clients_alive.set(n)

    def observe_staleness(self, taus: list[int]) -> None:
        """The staleness of each update a buffered version folded."""
        for tau in taus:
            self.update_staleness.observe(tau)

    def exposition(self) -> bytes:
        """This registry in the Prometheus text format (what /metrics would serve in-process)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


_default: AggregatorMetrics | None = None
_default_lock = threading.Lock()


def default() -> AggregatorMetrics:
    """The process's metrics (created on first use, in fedq's own registry)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = AggregatorMetrics()
    return _default


def observe_update(accepted: bool, reason: str | None = None, nbytes: int = 0) -> None:
    """Count one client update (see AggregatorMetrics.observe_update)."""
    default().observe_update(accepted, reason, nbytes)


def observe_round(seconds: float) -> None:
    """Count one committed round and its duration in seconds."""
    default().observe_round(seconds)


def set_clients_alive(n: int) -> None:
    """Set how many clients of the run being driven have a live heartbeat."""
    default().set_clients_alive(n)


def observe_staleness(taus: list[int]) -> None:
    """Count the staleness of a buffered version's updates (see AggregatorMetrics.observe_staleness)."""
    default().observe_staleness(taus)


class RunGauges:
    """A scrape-time collector of where the runs an aggregator drives stand, read from Redis.

    Gauges labelled by run and strategy: current round, rounds planned, last test accuracy and
    loss, clients alive and expected. Only runs that ``runs()`` names and that are still running
    are served, so the label sets stay bounded (one run per worker at a time) and a finished
    run's series end with it. Read at scrape time: no per-process value files, so forked work
    horses need nothing of their own."""

    def __init__(self, r: Any, runs: Any) -> None:
        self.r = r
        self.runs = runs

    def describe(self) -> list[Any]:
        return []  # no fixed samples: registering must not scrape Redis

    def collect(self) -> Any:
        import json

        from prometheus_client.core import GaugeMetricFamily

        from fedq.protocol import heartbeat, keys

        labels = ["run", "strategy"]
        fams = {
            "round": GaugeMetricFamily("fedq_run_round", "Rounds committed so far, per running run.", labels=labels),
            "rounds": GaugeMetricFamily("fedq_run_rounds", "Rounds the running run will train.", labels=labels),
            "acc": GaugeMetricFamily("fedq_run_last_test_accuracy", "Central test accuracy of the last "
                                     "committed round.", labels=labels),
            "loss": GaugeMetricFamily("fedq_run_last_test_loss", "Central test loss of the last committed round.",
                                      labels=labels),
            "alive": GaugeMetricFamily("fedq_run_clients_alive", "Joined clients with a live heartbeat.",
                                       labels=labels),
            "expected": GaugeMetricFamily("fedq_run_clients_expected", "Clients the run expects.", labels=labels),
            # Buffered aggregation: the last committed model version's updates and their staleness.
            "v_updates": GaugeMetricFamily("fedq_run_version_updates", "Buffered aggregation: updates the last "
                                           "committed model version folded.", labels=labels),
            "v_mean": GaugeMetricFamily("fedq_run_version_staleness_mean", "Buffered aggregation: mean staleness "
                                        "(versions behind) of the last committed version's updates.", labels=labels),
            "v_max": GaugeMetricFamily("fedq_run_version_staleness_max", "Buffered aggregation: largest staleness "
                                       "(versions behind) among the last committed version's updates.", labels=labels),
        }
        try:
            run_ids = [x for x in (self.runs() or []) if x]
        except Exception:  # a scrape must not fail on the worker's bookkeeping
            run_ids = []
        for run_id in run_ids:
            try:
                k = keys.RunKeys(run_id)
                state = {_str(a): _str(b) for a, b in self.r.hgetall(k.state).items()}
                if state.get("status") != "running":
                    continue
                spec = json.loads(self.r.get(k.spec) or "{}")
                last = self.r.lindex(k.metrics, -1)
                m = json.loads(last) if last else {}
                members = sorted(_str(x) for x in self.r.smembers(k.members))
                alive = heartbeat.count_alive_clients(self.r, run_id, members)
            except Exception:  # Redis away, a run that vanished: serve the others
                continue
            lv = [run_id, str((spec.get("strategy") or {}).get("name", "fedavg"))]
            fams["round"].add_metric(lv, float(state.get("round") or 0))
            fams["rounds"].add_metric(lv, float(spec.get("rounds") or 0))
            shown = [("test_accuracy", "acc"), ("test_loss", "loss")]
            if "version" in m:  # a buffered run's last version
                shown += [("num_updates", "v_updates"), ("staleness_mean", "v_mean"), ("staleness_max", "v_max")]
            for key, fam in shown:
                if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool):
                    fams[fam].add_metric(lv, float(m[key]))
            fams["alive"].add_metric(lv, float(alive))
            fams["expected"].add_metric(lv, float(spec.get("clients") or 0))
        yield from fams.values()


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class BuildInfo:
    """fedq_build_info{version, python} 1: which fedq a scraped process runs."""

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Any:
        import platform

        from prometheus_client.core import InfoMetricFamily

        from fedq import __version__

        yield InfoMetricFamily("fedq_build", "The fedq version and Python of this process.",
                               value={"version": __version__, "python": platform.python_version()})


class MetricsServer:
    """A running /metrics endpoint; ``close`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def served_registry(r: Any = None, runs: Any = None) -> Any:
    """The registry /metrics serves: fedq's counters (in multiprocess mode, what every process
    wrote), this process's process_* and python_* metrics, fedq_build_info and, given a Redis
    client and a callable naming the runs driven, the per-run gauges (RunGauges)."""
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        # This process's own families, at 0, so that /metrics is never empty: a worker serves
        # before its first work horse has counted anything (an unset gauge is not served).
        default().set_clients_alive(0)
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward(default().registry))
    # The serving process's own figures (multiprocess mode has no such files: added here).
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(BuildInfo())
    if r is not None and runs is not None:
        registry.register(RunGauges(r, runs))
    return registry


class _Forward:
    """Serves another registry's families (fedq's counters) inside the served one."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        return self.registry.collect()


def start_metrics_server(port: int, host: str = "0.0.0.0", *, r: Any = None, runs: Any = None) -> MetricsServer:
    """Serve /metrics on host:port in a daemon thread (port 0: any free port).

    In multiprocess mode it serves what every process wrote into the shared directory
    (the worker's forked work horses included); otherwise the default() registry. With r and
    runs (a callable returning the run ids being driven), also the per-run gauges."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=served_registry(r, runs))
    return MetricsServer(server, thread)
