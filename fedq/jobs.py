"""rq integration: a run is an rq job on a queue; an aggregator is an rq worker."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import redis
from rq import Queue, Worker

from fedq.settings import Settings
from fedq.spec import RunSpec
from fedq.store import RunStore

log = logging.getLogger("fedq.jobs")

JOB_FUNC = "fedq.aggregator.drive_run"


def submit_run(r: redis.Redis, settings: Settings, spec: RunSpec, *, queue: str | None = None,
               at_front: bool = False) -> str:
    """Store a new run and enqueue it for an aggregator worker; returns the run id."""
    spec.validate()
    RunStore(r, spec.run_id).create(spec)
    q = Queue(queue or settings.queue, connection=r)
    q.enqueue_call(JOB_FUNC, args=(spec.run_id,), job_id=spec.run_id, timeout=settings.job_timeout,
                   result_ttl=7 * 24 * 3600, failure_ttl=30 * 24 * 3600, at_front=at_front,
                   description=f"fedq run {spec.run_id} ({spec.clients} clients, {spec.rounds} rounds)")
    log.info("submitted run %s to queue %s", spec.run_id, q.name)
    return spec.run_id


def run_worker(r: redis.Redis, settings: Settings, *, queue: str | None = None, burst: bool = False,
               name: str | None = None) -> bool:
    """Serve runs from the queue as an rq worker (each run in a forked work horse)."""
    # The work horse builds its own connection from the environment: make sure it sees ours,
    # including a URL given by flag rather than by FEDQ_REDIS_URL.
    os.environ["FEDQ_REDIS_URL"] = settings.redis_url
    q = Queue(queue or settings.queue, connection=r)
    worker = Worker([q], connection=r, name=name or f"fedq-{socket.gethostname()}-{os.getpid()}")
    log.info("aggregator worker %s serving queue %s%s", worker.name, q.name, " (burst)" if burst else "")
    return worker.work(burst=burst, logging_level=settings.log_level)


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
