"""Read-only views of Redis: `fedq status`, `fedq dashboard` and `fedq report`."""

from __future__ import annotations

from pathlib import Path

import click

from fedq.cli.parsing import settings_of, stop_on_signals
from fedq.clitools import fail_cleanly
from fedq.roles.plots import X_AXES


@click.command()
@click.option("--run", "run_id", help="One run (default: list recent runs).")
@click.option("--watch", is_flag=True, help="Keep the table current until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between redraws with --watch.")
@click.pass_context
@fail_cleanly
def status(ctx: click.Context, run_id: str | None, watch: bool, interval: float) -> None:
    """Show runs and their progress: clients, liveness, rounds, refusals (reads Redis only)."""
    from fedq.ops.dashboard.readonly import connect_readonly
    from fedq.ops.view import console, status_renderable, watch_status
    from fedq.protocol.connection import connect

    settings = settings_of(ctx)
    connect(settings).close()  # fails fast, with the URL (password hidden), when Redis is unreachable
    r = connect_readonly(settings)
    first = status_renderable(r, run_id)  # an unknown run is an error, also with --watch
    if not watch:
        console.print(first)
        return
    watch_status(r, run_id, interval, stop_on_signals())


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="FEDQ_DASHBOARD_HOST",
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8050, show_default=True,
              envvar="FEDQ_DASHBOARD_PORT")
@click.option("--threads", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Request threads of the server.")
@click.option("--refresh", type=click.FloatRange(min=0.5), default=2.0, show_default=True,
              help="Seconds between updates of an open page.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), envvar="FEDQ_DASHBOARD_TOKEN_FILE",
              help="File holding an access token every request must present (Bearer, or basic auth's "
                   "password); required when --host is not a loopback address (env FEDQ_DASHBOARD_TOKEN_FILE).")
@click.pass_context
@fail_cleanly
def dashboard(ctx: click.Context, host: str, port: int, threads: int, refresh: float,
              token_file: Path | None) -> None:
    """Serve the web dashboard: runs, rounds, clients, live charts (reads Redis only)."""
    from fedq.ops.dashboard.app import check_auth, read_token, serve

    token = read_token(token_file) if token_file is not None else None
    check_auth(host, token)
    click.echo(f"fedq dashboard on http://{host}:{port}/ (Ctrl-C to stop)", err=True)
    serve(settings_of(ctx), host=host, port=port, threads=threads, refresh_seconds=refresh, token=token)


@click.command()
@click.option("--run", "run_id", required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--x-axis", type=click.Choice(X_AXES), default="round", show_default=True,
              help="curves.png's x axis: rounds, or wall-clock minutes since the run first started.")
@click.pass_context
@fail_cleanly
def report(ctx: click.Context, run_id: str, out: Path, x_axis: str) -> None:
    """Write a run's report.json and curves.png and, when finished, model.keras and scaler.json into a directory."""
    from fedq.ops.view import print_report
    from fedq.protocol.connection import connect
    from fedq.protocol.store import RunStore
    from fedq.roles.report import write_report

    print_report(write_report(RunStore(connect(settings_of(ctx)), run_id), out, x_axis=x_axis), out)
