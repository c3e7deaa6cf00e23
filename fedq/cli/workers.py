"""The federation's long-lived processes: `fedq submit`, `fedq aggregator` (an rq worker) and `fedq client`."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from fedq.cli.options import data_options, run_options
from fedq.cli.panels import PanelCommand
from fedq.cli.parsing import data_spec, run_spec_from, settings_of, stop_on_signals
from fedq.clitools import fail_cleanly
from fedq.errors import FedqError


@click.command(cls=PanelCommand)
@run_options()
@click.option("--if-absent", is_flag=True,
              help="When a run with --run-id exists already, print its id and succeed (a re-run Job).")
@click.pass_context
@fail_cleanly
def submit(ctx: click.Context, if_absent: bool, **kw: Any) -> None:
    """Enqueue a run for an aggregator worker and print its id."""
    from fedq.protocol.connection import connect
    from fedq.protocol.store import RunStore
    from fedq.roles.jobs import submit_run
    from fedq.roles.runner import check_submitted

    settings = settings_of(ctx)
    spec = run_spec_from(kw)
    check_submitted(spec)  # the model builds for the data, before anything is stored
    r = connect(settings)
    if if_absent and RunStore(r, spec.run_id).exists():
        logging.getLogger("fedq.submit").info("run %s exists already; not submitting it again", spec.run_id)
        click.echo(spec.run_id)
        return
    click.echo(submit_run(r, settings, spec))


@click.command(cls=PanelCommand)
@click.option("--queue", help="rq queue to serve (default: FEDQ_QUEUE or fedq-runs).")
@click.option("--burst", is_flag=True, help="Exit when the queue is empty.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), envvar="FEDQ_METRICS_PORT",
              help="Serve Prometheus /metrics on this port (env FEDQ_METRICS_PORT).")
@click.option("--metrics-host", default="0.0.0.0", show_default=True, envvar="FEDQ_METRICS_HOST",
              help="Address /metrics listens on.")
@run_options(creating=False)
@click.pass_context
@fail_cleanly
def aggregator(ctx: click.Context, queue: str | None, burst: bool, metrics_port: int | None, metrics_host: str,
               **kw: Any) -> None:
    """Serve runs from the queue as an rq worker; with --clients/--rounds, create one run and drive it."""
    from fedq.protocol.connection import connect
    from fedq.roles.jobs import run_worker, submit_run

    settings = settings_of(ctx)
    r = connect(settings)
    if kw["clients"] is not None or kw["rounds"] is not None:
        if kw["clients"] is None or kw["rounds"] is None:
            raise click.UsageError("--clients and --rounds go together")
        from fedq.roles.runner import check_submitted

        spec = run_spec_from(kw)
        check_submitted(spec)
        # A private queue, so that this worker drives exactly the run it created, then exits.
        from fedq.roles.jobs import ONCE_QUEUE_PREFIX

        queue = f"{ONCE_QUEUE_PREFIX}{spec.run_id}"
        submit_run(r, settings, spec, queue=queue)
        click.echo(spec.run_id)
        burst = True
    run_worker(r, settings, queue=queue, burst=burst, metrics_port=metrics_port, metrics_host=metrics_host)
    if kw["clients"] is not None:
        from fedq.protocol.store import RunStore

        state = RunStore(r, spec.run_id).state()
        if state.get("status") != "finished":  # the run this command created must have succeeded
            raise FedqError(f"run {spec.run_id} {state.get('status')}: {state.get('reason') or 'not finished'}")


@click.command(cls=PanelCommand)
@click.option("--shard", type=click.IntRange(0), required=True, help="This client's shard, 0-based.")
@click.option("--num-shards", type=click.IntRange(1), help="Shards in all (default: the run's client count).")
@click.option("--run", "run_id", help="Run to join (default: the newest open run, waiting for one).")
@click.option("--once", is_flag=True, help="Exit after one run (a Kubernetes Job); default: follow runs.")
@click.option("--client-id", help="Identity in the run (default: client-<shard>).")
@click.option("--delay", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Seconds added to every local training: a straggler, for experiments.")
@data_options(required=False)
@click.pass_context
@fail_cleanly
def client(ctx: click.Context, shard: int, num_shards: int | None, run_id: str | None, once: bool,
           client_id: str | None, delay: float, **kw: Any) -> None:
    """Join runs and train on this client's own data."""
    from fedq.protocol.connection import connect
    from fedq.roles.client import Client, Stopped

    if num_shards is not None and shard >= num_shards:
        raise click.BadParameter(f"{shard} is out of range for --num-shards {num_shards} (0..{num_shards - 1})",
                                 param_hint="--shard")
    data = data_spec(kw["normal_csv"], kw["abnormal_csv"], kw["csv_path"], kw["label_column"],
                      kw["missing_value"], kw["test_fraction"], 0, default=False)
    stop = stop_on_signals()
    settings = settings_of(ctx)
    c = Client(connect(settings), settings, shard, num_shards=num_shards, run_id=run_id,
               client_id=client_id, data=data, stop=stop, delay=delay)
    try:
        c.serve(once=once)
    except Stopped:
        logging.getLogger("fedq.roles.client").info("stopped by signal")
        # Its run is left cleanly (heartbeat gone); skip the interpreter's teardown, which with
        # TensorFlow loaded takes a second or two of a stop that should be prompt.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
