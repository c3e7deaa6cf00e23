"""rq integration: a run is an rq job on a queue; an aggregator is an rq worker."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import redis
from rq import Queue, Worker

from fedq.errors import FedqError
from fedq.learning.spec import RunSpec
from fedq.protocol.connection import connect
from fedq.protocol.heartbeat import aggregator_heartbeat
from fedq.protocol.store import RunStore, list_runs
from fedq.protocol.vocabulary import ENDED, Status
from fedq.roles.aggregator import Aggregator, AggregatorStopped, RunVanished
from fedq.roles.initial import store_with_run
from fedq.roles.lifecycle import die_with_parent, exit_soon, parent_died
from fedq.settings import Settings

log = logging.getLogger("fedq.roles.jobs")

JOB_FUNC = "fedq.roles.jobs.drive_run"
# `fedq aggregator --clients N` creates its run on a queue of its own (fedq-once-<run>), which no
# other worker serves: when that driver dies, any worker takes the run over on its own queue.
ONCE_QUEUE_PREFIX = "fedq-once-"


def submit_run(r: redis.Redis, settings: Settings, spec: RunSpec, *, queue: str | None = None,
               at_front: bool = False) -> str:
    """Store a new run and enqueue it for an aggregator worker; returns the run id."""
    spec.validate()
    q = Queue(queue or settings.queue, connection=r)
    # store.SpecRecord declares rounds/clients settable, RunSpec is frozen: the ignore goes (warn_unused_ignores
    # says when) once SpecRecord's members are read-only (fedq/protocol/store.py is being rewritten).
    RunStore(r, spec.run_id).create(spec, queue=q.name)  # type: ignore[arg-type]
    store_with_run(r, settings, spec)  # a run without central evaluation brings its initial model
    q.enqueue_call(JOB_FUNC, args=(spec.run_id,), job_id=spec.run_id, timeout=settings.job_timeout,
                   result_ttl=7 * 24 * 3600, failure_ttl=30 * 24 * 3600, at_front=at_front,
                   description=f"fedq run {spec.run_id} ({spec.clients} clients, {spec.rounds} rounds)")
    log.info("submitted run %s to queue %s", spec.run_id, q.name)
    return spec.run_id


def run_worker(r: redis.Redis, settings: Settings, *, queue: str | None = None, burst: bool = False,
               name: str | None = None, metrics_port: int | None = None, metrics_host: str = "0.0.0.0") -> bool:
    """Serve runs from the queue as an rq worker (each run in a forked work horse).

    The worker keeps a heartbeat (fedq:aggregators:<name>) while it lives and, with
    metrics_port, serves Prometheus /metrics with what its work horses counted."""
    # The work horse builds its own connection from the environment: make sure it sees ours,
    # including a URL given by flag rather than by FEDQ_REDIS_URL.
    os.environ["FEDQ_REDIS_URL"] = settings.redis_url
    q = Queue(queue or settings.queue, connection=r)
    # Maintenance (where orphaned runs are recovered) runs between dequeues; rq's dequeue
    # blocks worker_ttl - 15 s, so both are tied to the lease to bound takeover time.
    lease = max(1, int(settings.lease_seconds))
    worker = FedqWorker([q], connection=r, name=name or f"fedq-{socket.gethostname()}-{os.getpid()}",
                        worker_ttl=lease + 15, maintenance_interval=lease, job_monitoring_interval=lease)
    worker.fedq_settings = settings
    log.info("aggregator worker %s serving queue %s%s", worker.name, q.name, " (burst)" if burst else "")
    if metrics_port is not None:
        from fedq.roles import metrics

        metrics.prepare_multiprocess()  # work horses count in their own processes; this one adds up
        server = metrics.start_metrics_server(metrics_port, metrics_host, r=connect(settings, check=False),
                                              runs=lambda: [_current_run(worker)])
        log.info("Prometheus metrics on http://%s:%d/metrics", metrics_host, server.port)
    # Its own connection: the thread must not share a pool with the worker across its forks.
    beat = aggregator_heartbeat(connect(settings, check=False), worker.name, queue=q.name,
                                extra=lambda: {"run": _current_run(worker)}).start()
    try:
        return worker.work(burst=burst, logging_level=settings.log_level)
    finally:
        beat.stop()


def _current_run(worker: Worker) -> str | None:
    """The run the worker's work horse is driving (rq keeps the job in memory; job id = run id)."""
    try:
        execution = next(iter(list(worker.executions.values())), None)
    except (AttributeError, RuntimeError):
        return None
    return None if execution is None else execution.job_id.split("-resume-")[0]


def job_status(r: redis.Redis, run_id: str) -> str | None:
    """The rq status of a run's job, or None when it was not enqueued through rq."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    try:
        status = Job.fetch(run_id, connection=r).get_status()
        return getattr(status, "value", status)
    except NoSuchJobError:
        return None


def describe(spec: RunSpec) -> dict[str, Any]:
    """Short human summary of a spec, for CLI output."""
    return {"run": spec.run_id, "clients": spec.clients, "rounds": spec.rounds,
            "data": spec.data.source, "model": spec.model}


class FedqWorker(Worker):
    """An rq worker that stops runs gracefully and recovers runs whose driver died.

    Its work horse ends with it: rq forks the horse into a process group of its own (so Ctrl-C
    in a terminal does not reach it) and PR_SET_PDEATHSIG does not pass through fork, so the
    horse asks for its own signal when the worker exits. A worker whose parent died (fedq run
    was killed, and its private Redis with it) stops within seconds instead of retrying a Redis
    that is gone."""

    fedq_settings: Settings
    _fedq_parent: int = 0

    def work(self, *args: Any, **kwargs: Any) -> bool:
        self._fedq_parent = os.getppid()
        return super().work(*args, **kwargs)

    def request_stop(self, signum: int, frame: Any) -> None:
        # rq's warm shutdown waits for the job, which for a federation may be hours: tell the
        # work horse to release its run (a standby takes it over) and finish now.
        if self.horse_pid:
            try:
                os.kill(self.horse_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self._fedq_parent and parent_died(self._fedq_parent):
            log.warning("worker %s: its parent is gone; stopping within seconds", self.name)
            exit_soon(before=self._kill_horse_now)
        # When idle, rq stops by raising StopRequested from this handler, wherever the worker is;
        # a logging call (its maintenance logs) swallows it, and the worker would go on for good.
        # The flag makes its loop stop at its next turn all the same.
        self._stop_requested = True
        super().request_stop(signum, frame)

    def _kill_horse_now(self) -> None:
        """SIGKILL the horse's process group (the horse and the initial model's builder)."""
        if self.horse_pid:
            try:
                os.killpg(self.horse_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def perform_job(self, job: Any, queue: Queue, *args: Any, **kwargs: Any) -> bool:
        try:
            return super().perform_job(job, queue, *args, **kwargs)
        finally:
            _run_ended_metrics()  # in the horse: its run has no clients any more

    def execute_job(self, job: Any, queue: Queue) -> None:
        try:
            super().execute_job(job, queue)
        finally:
            _run_ended_metrics()  # in the worker: also when the horse was killed

    def setup_work_horse_signals(self) -> None:
        worker = os.getppid()
        # In the horse, right after the fork. SIGKILL: a worker that died without stopping its
        # horse (killed, out of memory) cannot see the run released; the lease expires instead.
        die_with_parent(signal.SIGKILL)
        if parent_died(worker):  # the worker was gone before die_with_parent took effect
            os._exit(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: HORSE_STOP.set())

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        try:
            recover_orphans(self.connection, self.fedq_settings, [q.name for q in self.queues])
        except redis.RedisError as exc:
            log.warning("orphan recovery skipped: %s", exc)


def _run_ended_metrics() -> None:
    """A run's gauges drop to 0 when its driving ends (Prometheus would keep the last value)."""
    from fedq.roles import metrics

    if metrics.multiprocess_enabled():
        metrics.set_clients_alive(0)


def enqueue_resume(r: redis.Redis, settings: Settings, run_id: str, queue: str | None = None) -> str | None:
    """Enqueue a job that takes over run_id, once per lease period; returns the job id.

    queue: where (default: the run's own queue); a run moved to another queue records it."""
    store = RunStore(r, run_id)
    state = store.state()
    if not state or state.get("status") in ENDED:
        return None
    if not r.set(store.k.resume_lock, "1", nx=True, px=int(settings.lease_seconds * 2000)):
        return None  # someone just did
    job_id = f"{run_id}-resume-{int(time.time() * 1000)}"
    target = queue or state.get("queue") or settings.queue
    if target != state.get("queue"):
        r.hset(store.k.state, "queue", target)  # later recoveries, and fedq status, see where it went
    Queue(target, connection=r).enqueue_call(
        JOB_FUNC, args=(run_id,), job_id=job_id, timeout=settings.job_timeout, at_front=True,
        result_ttl=7 * 24 * 3600, failure_ttl=30 * 24 * 3600, description=f"fedq resume {run_id}")
    log.info("enqueued %s to take over run %s", job_id, run_id)
    return job_id


def recover_orphans(r: redis.Redis, settings: Settings, queues: list[str]) -> list[str]:
    """Re-enqueue runs that were started but have no driver and no standby: runs on these queues,
    and runs of a `fedq aggregator --clients N` whose driver died (onto the first of queues)."""
    recovered = []
    for run_id in list_runs(r, limit=200):  # ids that are no valid run id are skipped there
        store = RunStore(r, run_id)
        try:
            state = store.state()
            float(state.get("created_at") or 0)
        except (redis.ResponseError, ValueError) as exc:  # a state key written around fedq
            log.warning("run %s: unreadable state, not recovered: %s", run_id, exc)
            continue
        if not state or state.get("status") in ENDED:
            continue
        queue = state.get("queue") or settings.queue
        if queue not in queues and not queue.startswith(ONCE_QUEUE_PREFIX):
            continue
        if not state.get("started_at"):
            # Never driven: only an orphan if its job was lost between create and enqueue.
            old_enough = time.time() - float(state.get("created_at", 0)) > 2 * settings.lease_seconds
            if not old_enough or job_status(r, run_id) is not None:
                continue
        if r.exists(store.k.lease) or r.exists(store.k.standby):
            continue
        log.warning("run %s has no live driver (last: %s); recovering it", run_id, state.get("driver"))
        if enqueue_resume(r, settings, run_id, queue=None if queue in queues else queues[0]):
            recovered.append(run_id)
    return recovered


# Set by SIGTERM in an rq work horse (see fedq.roles.jobs.FedqWorker); the driving loop checks it.
HORSE_STOP = threading.Event()


def drive_run(run_id: str) -> dict[str, Any]:
    """rq job: drive one run with settings from the environment (the worker exports them)."""
    settings = Settings.from_env()
    r = connect(settings)
    try:
        state = Aggregator(r, settings, run_id, stop=HORSE_STOP).run()
    except AggregatorStopped as exc:
        # Graceful stop: the lease is released; hand the run to whichever worker is free.
        log.info("%s", exc)
        enqueue_resume(r, settings, run_id)
        return {"stopped": True, "run": run_id}
    except RunVanished:
        raise
    except Exception as exc:
        # Whatever broke, the run must not stay "running" with nobody driving it.
        log.exception("run %s: aggregator crashed", run_id)
        RunStore(r, run_id).fail(f"aggregator crashed: {type(exc).__name__}: {exc}")
        raise
    if state.get("status") == Status.FAILED:
        # The run is marked failed with its reason already; the job fails too, so that rq's
        # log and registries say so rather than "Job OK".
        raise RunEndedFailed(f"run {run_id} failed: {state.get('reason') or 'no reason recorded'}")
    return state


class RunEndedFailed(FedqError):
    """The run this job drove ended failed (its reason is in Redis and in the message)."""
