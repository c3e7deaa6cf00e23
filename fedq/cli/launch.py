"""Launchers: `fedq run` (a whole federation on this machine), `fedq simulate` and its workers."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import click

from fedq.cli.options import run_options, straggler_options
from fedq.cli.panels import PanelCommand
from fedq.cli.parsing import run_spec_from, settings_of, stragglers_from
from fedq.clitools import EXIT_ERROR, fail_cleanly
from fedq.errors import FedqError


@click.command(cls=PanelCommand)
@run_options()
@straggler_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("fedq-out"),
              show_default=True, help="Directory for report.json, model.keras and logs.")
@click.pass_context
@fail_cleanly
def run(ctx: click.Context, out: Path, **kw: Any) -> None:
    """Run a whole federation on this machine: Redis, an aggregator and N clients."""
    from fedq.ops.view import RunProgress, print_event, print_report, print_round
    from fedq.roles.runner import run_local

    stragglers = stragglers_from(kw)
    spec = run_spec_from(kw)
    with RunProgress(spec.rounds, spec.clients) as progress:  # silent when stdout is not a terminal
        report = run_local(settings_of(ctx), spec, out, use_env_redis=ctx.obj["redis_from_env"],
                           on_round=functools.partial(print_round, spec.rounds), on_event=print_event,
                           on_progress=progress.update, stragglers=stragglers)
    print_report(report, out)
    if report["status"] != "finished":
        sys.exit(EXIT_ERROR)


@click.command(cls=PanelCommand)
@run_options()
@click.option("--rows-per-client", type=click.IntRange(10), default=100, show_default=True,
              help="Synthetic rows per client (when no data file is given).")
@click.option("--features", type=click.IntRange(5), default=20, show_default=True,
              help="Synthetic features (when no data file is given).")
@click.option("--processes", type=click.IntRange(1), default=None,
              help="Processes the simulated clients are spread over (threads within each) "
                   "[default: one per 250 clients, at least 4].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("fedq-sim"),
              show_default=True)
@straggler_options
@click.pass_context
@fail_cleanly
def simulate(ctx: click.Context, rows_per_client: int, features: int, processes: int | None, out: Path,
             **kw: Any) -> None:
    """Many lightweight clients (numpy updates, no TensorFlow) against the real aggregator and protocol."""
    import dataclasses

    from fedq.ops.view import print_event, print_report, print_round
    from fedq.roles.runner import run_local
    from fedq.roles.swarm import client_commands, default_processes

    own_data = any(kw.get(k) for k in ("normal_csv", "abnormal_csv", "csv_path"))
    stragglers = stragglers_from(kw)
    spec = run_spec_from(kw)
    if spec.secure_aggregation:
        raise click.UsageError("fedq simulate's numpy clients do not run secure aggregation: use fedq run")
    if not own_data:
        spec = dataclasses.replace(spec, data=dataclasses.replace(
            spec.data, source="synthetic", rows=rows_per_client * spec.clients, features=features)).validate()
    report = run_local(settings_of(ctx), spec, out, use_env_redis=ctx.obj["redis_from_env"],
                       on_round=functools.partial(print_round, spec.rounds), on_event=print_event,
                       client_commands=client_commands(spec, processes or default_processes(spec.clients),
                                                       stragglers=stragglers))
    print_report(report, out)
    rounds = report["rounds"][1:] or report["rounds"]  # round 1 includes start-up
    if rounds:
        seconds, updates = sum(m["seconds"] for m in rounds), sum(m["num_updates"] for m in rounds)
        what = "versions" if spec.buffered else "rounds"
        click.echo(f"{spec.clients} clients: {seconds / updates * 1000:.2f} ms of {what[:-1]} time per update, "
                   f"{updates / seconds:.1f} updates folded per second "
                   f"({what} {rounds[0]['round']}-{rounds[-1]['round']})")
    if report["status"] != "finished":
        sys.exit(EXIT_ERROR)


@click.command("sim-worker", hidden=True)
@click.option("--run", "run_id", required=True)
@click.option("--first", type=click.IntRange(0), required=True)
@click.option("--count", type=click.IntRange(1), required=True)
@click.option("--scale", type=click.FloatRange(0), default=1e-3)
@click.option("--delay-from", type=click.IntRange(0), help="Shards from this one on are stragglers.")
@click.option("--delay", type=click.FloatRange(0), default=0.0)
@click.pass_context
@fail_cleanly
def sim_worker(ctx: click.Context, run_id: str, first: int, count: int, scale: float, delay_from: int | None,
               delay: float) -> None:
    """Internal: run simulated clients first..first+count-1 of a run as threads."""
    from fedq.roles.swarm import run_worker

    failed = run_worker(settings_of(ctx), run_id, first, count, scale,
                        delay=(delay_from, delay) if delay_from is not None else None)
    if failed:
        raise FedqError(f"{failed} of {count} simulated clients failed")
