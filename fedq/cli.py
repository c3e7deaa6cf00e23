"""Command line: thin wrappers that parse options and call library functions."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import click

from fedq.clitools import EXIT_ERROR, fail_cleanly
from fedq.errors import ConfigError, FedqError
from fedq.learning.choices import OPTIMIZERS
from fedq.learning.dataspec import DataSpec, seed_spec
from fedq.protocol.vocabulary import ENCODINGS
from fedq.roles.plots import X_AXES
from fedq.settings import Settings

if TYPE_CHECKING:
    from fedq.learning.spec import RunSpec


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj["settings"]
    return settings


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM/SIGINT, which Kubernetes and Ctrl-C send, for loops to check.

    A process whose parent died (a killed `fedq run`, whose private Redis went with it) gets a
    few seconds to stop, then ends, rather than retrying a Redis that is gone."""
    from fedq.roles.lifecycle import exit_soon, parent_died

    stop = threading.Event()
    parent = os.getppid()

    def handler(signum: int, _frame: Any) -> None:
        if not stop.is_set() and parent_died(parent):
            exit_soon()
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


# --- help panels -------------------------------------------------------------------------
# `fedq run --help` and its kin take forty-odd options: their help lists them in these titled
# panels, in this order (keys are the options' parameter names). An option of a PanelCommand that
# no panel names is listed under OTHER_PANEL; tests/test_cli_help.py keeps that to --help.
HELP_PANELS: dict[str, tuple[str, ...]] = {
    "Data": ("normal_csv", "abnormal_csv", "csv_path", "label_column", "missing_value", "test_fraction",
             "partition", "alpha", "rows_per_client", "features"),
    "Federation": ("clients", "rounds", "fraction_fit", "round_timeout", "min_clients", "round_retries"),
    "Client training": ("local_epochs", "batch_size", "optimizer", "learning_rate", "model", "seed"),
    "Strategy": ("strategy", "server_lr", "server_momentum", "beta1", "beta2", "tau", "mu", "trim_fraction",
                 "byzantine", "krum_keep", "clip_norm", "max_held_mb", "max_client_share"),
    "Privacy": ("dp", "dp_clip", "dp_noise", "dp_delta"),
    "Secure aggregation": ("secure_aggregation", "secagg_neighbours", "secagg_threshold", "secagg_clip",
                           "secagg_bits"),
    "Aggregation": ("aggregation", "buffer_size", "max_staleness", "staleness_weight", "straggler_clients",
                    "straggler_delay"),
    "Evaluation": ("central_eval", "val_fraction"),
    "Transport": ("compression", "keep_updates"),
    "Client": ("shard", "num_shards", "client_id", "once", "delay"),
    "Worker": ("queue", "burst", "metrics_port", "metrics_host"),
    "Run control": ("run_id", "if_absent", "out", "processes"),
}
OTHER_PANEL = "Other options"
_PANEL_OF = {name: title for title, names in HELP_PANELS.items() for name in names}


class PanelCommand(click.Command):
    """A click command whose --help lists its options in the titled panels of HELP_PANELS.

    Only the help changes: parsing, option names and defaults are click's as usual."""

    def panels(self, ctx: click.Context) -> list[tuple[str, list[click.Parameter]]]:
        """(title, parameters) of every non-empty panel, in HELP_PANELS order, OTHER_PANEL last."""
        grouped: dict[str, list[click.Parameter]] = {}
        for param in self.get_params(ctx):
            grouped.setdefault(_PANEL_OF.get(param.name or "", OTHER_PANEL), []).append(param)
        return [(title, grouped[title]) for title in (*HELP_PANELS, OTHER_PANEL) if title in grouped]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for title, params in self.panels(ctx):
            records = [rec for rec in (p.get_help_record(ctx) for p in params) if rec is not None]
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


# --- shared options ----------------------------------------------------------------------
def data_options(required: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Options that choose the data: seed CSV pair, one labelled CSV, or the built-in dataset."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed([
            click.option("--normal-csv", type=click.Path(dir_okay=False),
                         help="Seed format: rows of class 0 (normal)."),
            click.option("--abnormal-csv", type=click.Path(dir_okay=False),
                         help="Seed format: rows of class 1 (abnormal)."),
            click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
                         help="One CSV with a header and a label column."),
            click.option("--label-column", help="Label column of --csv."),
            click.option("--missing-value", type=float, help="Value meaning missing (seed CSVs: -1)."),
            click.option("--test-fraction", type=float, default=0.2 if required else None, show_default=required,
                         help="Share of rows held out as the test split."),
        ]):
            fn = opt(fn)
        return fn
    return deco


@overload
def _data_spec(normal_csv: str | None, abnormal_csv: str | None, csv_path: str | None,
               label_column: str | None, missing_value: float | None, test_fraction: float | None,
               seed: int, default: Literal[True]) -> DataSpec: ...


@overload
def _data_spec(normal_csv: str | None, abnormal_csv: str | None, csv_path: str | None,
               label_column: str | None, missing_value: float | None, test_fraction: float | None,
               seed: int, default: bool) -> DataSpec | None: ...


def _data_spec(normal_csv: str | None, abnormal_csv: str | None, csv_path: str | None,
               label_column: str | None, missing_value: float | None, test_fraction: float | None,
               seed: int, default: bool) -> DataSpec | None:
    """The DataSpec the data options describe (None when none was given and default is False)."""
    extra: dict[str, Any] = {"seed": seed}
    if test_fraction is not None:
        extra["test_fraction"] = test_fraction
    if normal_csv or abnormal_csv:
        if not (normal_csv and abnormal_csv):
            raise click.UsageError("--normal-csv and --abnormal-csv go together")
        if csv_path:
            raise click.UsageError("use either --csv or --normal-csv/--abnormal-csv, not both")
        if missing_value is not None:
            extra["missing_value"] = missing_value
        spec = seed_spec(os.path.abspath(normal_csv), os.path.abspath(abnormal_csv), **extra)
    elif csv_path:
        if not label_column:
            raise click.UsageError("--csv needs --label-column")
        spec = DataSpec(source="csv", csv=os.path.abspath(csv_path), label_column=label_column,
                        missing_value=missing_value, **extra)
    elif default:
        spec = DataSpec(**extra)
    else:
        return None
    spec.validate()
    return spec


def run_options(creating: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Options that define a run (stored in Redis as its spec).

    With creating=False (the aggregator), --clients and --rounds are optional: given, they
    create a run; absent, the command serves the queue."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sized: dict[str, Any] = {"show_default": True} if creating else {}
        options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
            click.option("--clients", type=click.IntRange(1), default=2 if creating else None,
                         help="Clients per round (N)." if creating else "Create a run with N clients and drive it now.",
                         **sized),
            click.option("--rounds", type=click.IntRange(1), default=5 if creating else None,
                         help="Federated rounds." if creating else "Rounds of the run created with --clients.",
                         **sized),
            click.option("--local-epochs", type=click.IntRange(1), default=5, show_default=True,
                         help="Local epochs per round."),
            click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True),
            click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True),
            click.option("--learning-rate", type=float, default=0.01, show_default=True),
            click.option("--model", default="seed", show_default=True,
                         help="Model: 'seed' (the Kubeflow example's CNN; 5+ features), 'mlp' (a small dense "
                              "network, any number of features), 'package.module:build_fn' (returns a "
                              "compiled Keras model given input shape and class count) or path/model.keras."),
            click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
                         help="Seed of split, shards and weights."),
            click.option("--round-timeout", type=click.FloatRange(min=0, min_open=True), default=3600.0,
                         show_default=True,
                         help="Seconds a round waits for all updates before closing with the quorum."),
            click.option("--min-clients", type=click.IntRange(1),
                         help="Quorum: updates a round needs at its deadline (default: all clients)."),
            click.option("--round-retries", type=click.IntRange(0), default=2, show_default=True,
                         help="Extra deadline periods a round below the quorum waits before the run fails."),
            click.option("--keep-updates", is_flag=True, help="Keep every round's updates in Redis for audit."),
            click.option("--compression", type=click.Choice(ENCODINGS), default="none", show_default=True,
                         help="Updates travel as float32 weights (none), or as their delta from the global "
                              "model in float16 or int8 (a scale per 4096 values); the error is reported."),
            click.option("--central-eval/--no-central-eval", default=True, show_default=True,
                         help="Evaluate each round's model on the held-out test split in the aggregator. "
                              "Off, the aggregator never loads TensorFlow and, with fedavg or fedprox, holds "
                              "only the float64 sum of the updates (models of a GB and more)."),
            *strategy_options(),
            *aggregation_options(),
            click.option("--run-id", help="Id of the new run (default: time + random)."),
        ]
        for opt in reversed(options):
            fn = opt(fn)
        return data_options(required=True)(fn)
    return deco


def strategy_options() -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """Strategy, client sampling, partitioning and evaluation options of a run (fedq.learning.strategies)."""
    from fedq.learning.choices import DEFAULT_DELTA, STRATEGIES
    from fedq.learning.choices import DP_MODES as MODES
    from fedq.learning.dataspec import PARTITIONS

    pos = click.FloatRange(min=0, min_open=True)
    return [
        click.option("--strategy", type=click.Choice(STRATEGIES), default="fedavg", show_default=True,
                     help="How updates become the next global model."),
        click.option("--server-lr", type=pos,
                     help="Server learning rate (fedavgm 1.0; fedadam/fedyogi/fedadagrad 0.1)."),
        click.option("--server-momentum", type=click.FloatRange(0, 1, max_open=True), help="fedavgm's momentum (0.5)."),
        click.option("--beta1", type=click.FloatRange(0, 1, max_open=True), help="Adaptive: first-moment decay (0.9)."),
        click.option("--beta2", type=click.FloatRange(0, 1, max_open=True),
                     help="fedadam/fedyogi: second-moment decay (0.99)."),
        click.option("--tau", type=pos, help="Adaptive: adaptivity, added to sqrt(v) (1e-3)."),
        click.option("--mu", type=click.FloatRange(min=0), help="FedProx proximal term in client training "
                                                                 "(fedprox 0.1; usable with any strategy)."),
        click.option("--trim-fraction", type=click.FloatRange(0, 0.5, max_open=True), default=0.2, show_default=True,
                     help="trimmed-mean: share of values dropped at each end."),
        click.option("--byzantine", type=click.IntRange(0), default=1, show_default=True,
                     help="krum/multi-krum: clients assumed malicious (f)."),
        click.option("--krum-keep", type=click.IntRange(1), help="krum/multi-krum: updates averaged (1 / n - f)."),
        click.option("--clip-norm", type=pos,
                     help="Clip each update's L2 norm (model - global) to this (any strategy)."),
        click.option("--max-held-mb", type=pos, default=1024.0, show_default=True,
                     help="Robust strategies hold a round's N updates: refuse runs needing more MiB."),
        click.option("--fraction-fit", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     help="Share of clients that train each round (a seeded choice per round)."),
        click.option("--partition", type=click.Choice(PARTITIONS), default="iid", show_default=True,
                     help="How training rows are dealt to clients (simulations)."),
        click.option("--alpha", type=pos, default=0.5, show_default=True,
                     help="Dirichlet concentration of --partition dirichlet."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
                     help="Share of each client's rows held out for federated evaluation (0: none)."),
        click.option("--max-client-share", type=click.FloatRange(0, 1, min_open=True),
                     help="Cap any one update's weight in a round's mean at this share (sample counts are "
                          "the clients' claims); off by default."),
        click.option("--dp", type=click.Choice(MODES), default="off", show_default=True,
                     help="Differential privacy: central (the aggregator clips updates and noises their mean) "
                          "or local (each client clips and noises its update before pushing)."),
        click.option("--dp-clip", type=pos, help="DP: L2 norm C each update (model - global) is clipped to."),
        click.option("--dp-noise", type=pos, help="DP: noise multiplier z (Gaussian noise std = z x C)."),
        click.option("--dp-delta", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=DEFAULT_DELTA, show_default=True, help="DP: the delta epsilon is reported for."),
        click.option("--secure-aggregation", is_flag=True,
                     help="SecAgg+: clients mask their updates, so the aggregator and Redis see only their sum "
                          "(mean-based strategies, no compression or --clip-norm)."),
        click.option("--secagg-neighbours", type=click.IntRange(1),
                     help="Secure aggregation: clients each client shares its secrets with and masks against "
                          "(Flower's num_shares - 1; even, or all others; default: all others)."),
        click.option("--secagg-threshold", type=click.IntRange(2),
                     help="Secure aggregation: shares that rebuild a client's secrets (Flower's "
                          "reconstruction_threshold; more than half of neighbours + 1, the default)."),
        click.option("--secagg-clip", type=pos, default=8.0, show_default=True,
                     help="Secure aggregation: each value of an update (its delta) is clipped to [-clip, clip]."),
        click.option("--secagg-bits", type=click.IntRange(1, 31), default=22, show_default=True,
                     help="Secure aggregation: fixed-point levels per value, 2^bits (Flower's quantization_range)."),
    ]


def aggregation_options() -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """How updates become model versions: synchronous rounds, or buffered (fedq.learning.staleness)."""
    from fedq.learning.choices import AGGREGATIONS, DEFAULT_MAX_STALENESS
    from fedq.learning.choices import DEFAULT_STALENESS_WEIGHT as DEFAULT_WEIGHT
    from fedq.learning.choices import STALENESS_WEIGHTS as WEIGHTS

    return [
        click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="sync", show_default=True,
                     help="sync: rounds, every client answers, then one commit. buffered (FedBuff): clients "
                          "train from the newest model version and push when done; every --buffer-size "
                          "updates make the next version (--rounds counts versions)."),
        click.option("--buffer-size", type=click.IntRange(1),
                     help="Buffered: updates per model version, K (default: half the clients, rounded up)."),
        click.option("--max-staleness", type=click.IntRange(0),
                     help=f"Buffered: refuse updates trained from a version more than this many versions "
                          f"behind the newest ({DEFAULT_MAX_STALENESS})."),
        click.option("--staleness-weight", type=click.Choice(WEIGHTS),
                     help=f"Buffered: weight s(tau) of an update tau versions old ({DEFAULT_WEIGHT}: "
                          f"1/sqrt(1+tau); hinge: 1 up to 4 versions, then 1/(1+(tau-4)); constant: 1)."),
    ]


def straggler_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--straggler-clients and --straggler-delay (fedq run, fedq simulate): slow clients for experiments."""
    fn = click.option("--straggler-delay", type=click.FloatRange(0), default=0.0, show_default=True,
                      help="Seconds each straggler adds to every local training.")(fn)
    return click.option("--straggler-clients", type=click.IntRange(0), default=0, show_default=True,
                        help="Make the last M clients stragglers (experiments; see --straggler-delay).")(fn)


def _stragglers(kw: dict[str, Any]) -> tuple[int, float]:
    """(M, delay) from --straggler-clients and --straggler-delay, checked against --clients."""
    count, delay = kw.pop("straggler_clients"), kw.pop("straggler_delay")
    if count > (kw.get("clients") or 0):
        raise click.BadParameter(f"{count} is more than the {kw.get('clients')} clients",
                                 param_hint="--straggler-clients")
    if count and not delay:
        raise click.BadParameter("stragglers need a delay", param_hint="--straggler-delay")
    return count, delay


def _run_spec(kw: dict[str, Any]) -> RunSpec:
    import dataclasses

    from fedq.learning.models import resolve_model_arg
    from fedq.learning.spec import RunSpec, new_run_id
    from fedq.learning.strategies import StrategySpec

    data = _data_spec(kw.pop("normal_csv"), kw.pop("abnormal_csv"), kw.pop("csv_path"), kw.pop("label_column"),
                      kw.pop("missing_value"), kw.pop("test_fraction"), kw["seed"], default=True)
    data = dataclasses.replace(data, partition=kw.pop("partition"), alpha=kw.pop("alpha"),
                               val_fraction=kw.pop("val_fraction"))
    data.validate()
    strategy = StrategySpec(name=kw.pop("strategy"), server_lr=kw.pop("server_lr"), momentum=kw.pop("server_momentum"),
                            beta1=kw.pop("beta1"), beta2=kw.pop("beta2"), tau=kw.pop("tau"), mu=kw.pop("mu"),
                            trim_fraction=kw.pop("trim_fraction"), byzantine=kw.pop("byzantine"),
                            krum_keep=kw.pop("krum_keep"), clip_norm=kw.pop("clip_norm"),
                            max_held_mb=kw.pop("max_held_mb"))
    kw["model"] = resolve_model_arg(kw["model"])
    run_id = kw.pop("run_id") or new_run_id()
    return RunSpec(data=data, run_id=run_id, strategy=strategy, **kw).validate()  # dp, dp_clip, ... as given


# --- commands ------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--redis-url", envvar="FEDQ_REDIS_URL", help="Redis URL (env FEDQ_REDIS_URL).")
@click.option("--log-level", envvar="FEDQ_LOG_LEVEL", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.version_option(package_name="fedq")
@click.pass_context
@fail_cleanly
def main(ctx: click.Context, redis_url: str | None, log_level: str) -> None:
    """fedq: federated learning of a Keras model over Redis."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    ctx.obj = {"settings": Settings.from_env(redis_url=redis_url, log_level=log_level.upper()),
               "redis_from_env": bool(redis_url)}


@main.command(cls=PanelCommand)
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

    stragglers = _stragglers(kw)
    spec = _run_spec(kw)
    with RunProgress(spec.rounds, spec.clients) as progress:  # silent when stdout is not a terminal
        report = run_local(_settings(ctx), spec, out, use_env_redis=ctx.obj["redis_from_env"],
                           on_round=functools.partial(print_round, spec.rounds), on_event=print_event,
                           on_progress=progress.update, stragglers=stragglers)
    print_report(report, out)
    if report["status"] != "finished":
        sys.exit(EXIT_ERROR)


@main.command(cls=PanelCommand)
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

    settings = _settings(ctx)
    spec = _run_spec(kw)
    check_submitted(spec)  # the model builds for the data, before anything is stored
    r = connect(settings)
    if if_absent and RunStore(r, spec.run_id).exists():
        logging.getLogger("fedq.submit").info("run %s exists already; not submitting it again", spec.run_id)
        click.echo(spec.run_id)
        return
    click.echo(submit_run(r, settings, spec))


@main.command(cls=PanelCommand)
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

    settings = _settings(ctx)
    r = connect(settings)
    if kw["clients"] is not None or kw["rounds"] is not None:
        if kw["clients"] is None or kw["rounds"] is None:
            raise click.UsageError("--clients and --rounds go together")
        from fedq.roles.runner import check_submitted

        spec = _run_spec(kw)
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


@main.command(cls=PanelCommand)
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
    data = _data_spec(kw["normal_csv"], kw["abnormal_csv"], kw["csv_path"], kw["label_column"],
                      kw["missing_value"], kw["test_fraction"], 0, default=False)
    stop = _stop_on_signals()
    settings = _settings(ctx)
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


@main.command()
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

    settings = _settings(ctx)
    connect(settings).close()  # fails fast, with the URL (password hidden), when Redis is unreachable
    r = connect_readonly(settings)
    first = status_renderable(r, run_id)  # an unknown run is an error, also with --watch
    if not watch:
        console.print(first)
        return
    watch_status(r, run_id, interval, _stop_on_signals())


@main.command()
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
    serve(_settings(ctx), host=host, port=port, threads=threads, refresh_seconds=refresh, token=token)


@main.command()
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

    print_report(write_report(RunStore(connect(_settings(ctx)), run_id), out, x_axis=x_axis), out)


@main.command(cls=PanelCommand)
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
    stragglers = _stragglers(kw)
    spec = _run_spec(kw)
    if spec.secure_aggregation:
        raise click.UsageError("fedq simulate's numpy clients do not run secure aggregation: use fedq run")
    if not own_data:
        spec = dataclasses.replace(spec, data=dataclasses.replace(
            spec.data, source="synthetic", rows=rows_per_client * spec.clients, features=features)).validate()
    report = run_local(_settings(ctx), spec, out, use_env_redis=ctx.obj["redis_from_env"],
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


@main.command("sim-worker", hidden=True)
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

    failed = run_worker(_settings(ctx), run_id, first, count, scale,
                        delay=(delay_from, delay) if delay_from is not None else None)
    if failed:
        raise FedqError(f"{failed} of {count} simulated clients failed")


@main.group("keys")
def keys_group() -> None:
    """Signing keys for signed updates."""


@keys_group.command("new")
@click.option("--clients", type=click.IntRange(1), required=True, help="Number of clients (ids client-0..N-1).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the private keys and the public registry.")
@click.option("--namespace", help="Namespace of the printed Kubernetes Secrets.")
@click.option("--max-examples", type=click.IntRange(1), default=None,
              help="Provision each client's largest sample count per update (edit client-keys.json's "
                   "\"limits\" for per-client values); an update claiming more is refused.")
@fail_cleanly
def keys_new(clients: int, out: Path, namespace: str | None, max_examples: int | None) -> None:
    """Make an Ed25519 key per client; write them and print them as Kubernetes Secrets.

    Give each client its own <id>.key (FEDQ_SIGNING_KEY) and the aggregator client-keys.json
    (FEDQ_CLIENT_KEYS); the aggregator then refuses any update without a valid signature."""
    from fedq.protocol.signing import new_keys, secrets_yaml

    private, registry = new_keys([f"client-{k}" for k in range(clients)], max_examples)
    out.mkdir(parents=True, exist_ok=True)
    for cid, pem in private.items():
        path = out / f"{cid}.key"
        path.write_bytes(pem)
        path.chmod(0o600)
    (out / "client-keys.json").write_text(json.dumps(registry, indent=2))
    click.echo(secrets_yaml(private, registry, namespace), nl=False)


@main.command("acl")
@click.option("--clients", type=int, help="Clients client-0 .. client-<N-1>.")
@click.option("--client-ids", help="Comma-separated client ids (instead of --clients).")
@click.option("--run", "run_id", default="*", show_default=True, help="Confine clients to this run ('*': any run).")
@click.option("--format", "fmt", type=click.Choice(["aclfile", "commands"]), default="aclfile", show_default=True,
              help="aclfile: lines for redis-server --aclfile (password digests only); commands: ACL SETUSER "
                   "commands for redis-cli (plain passwords).")
@click.option("--passwords", type=click.Path(dir_okay=False, path_type=Path),
              help="user=password file: passwords in it are reused, new ones are added (mode 0600).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Write a directory for deployments instead of printing: users.acl, passwords.env "
                   "(the --passwords file) and <user>.password, one per user (see README, Deploying).")
@fail_cleanly
def acl_cmd(clients: int | None, client_ids: str | None, run_id: str, fmt: str, passwords: Path | None,
            out: Path | None) -> None:
    """Print Redis ACL users for the aggregator, the dashboard and each client.

    Least privilege by key pattern: a client writes only fedq:{run}:c:<its id>:* (and may add
    itself to the run and ring the inbox); the aggregator owns fedq and rq keys; the dashboard
    only reads. Each process then connects as its user: FEDQ_REDIS_URL=redis://<user>:<password>@host,
    or FEDQ_REDIS_USERNAME=<user> with FEDQ_REDIS_PASSWORD_FILE=<a file holding the password>."""
    from fedq.ops import acl

    if client_ids:
        ids = [c.strip() for c in client_ids.split(",") if c.strip()]
    else:
        ids = [f"client-{k}" for k in range(clients or 0)]
    if not ids:
        raise ConfigError("give at least one client (--clients N or --client-ids a,b)")
    if out is not None:
        if passwords is not None or fmt != "aclfile":
            raise ConfigError("--out writes its own passwords file and ACL file: leave out --passwords and --format")
        passwords = out / acl.PASSWORDS_FILE
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is not a directory")
    known = acl.parse_passwords(passwords.read_text()) if passwords is not None and passwords.exists() else {}
    users = acl.users(ids, run_id, known)
    if fmt == "aclfile" and passwords is None:
        raise ConfigError("--format aclfile prints only password digests: give --passwords FILE to keep the passwords")
    if out is not None:
        for path in acl.write_dir(out, users):
            click.echo(str(path))
        return
    if passwords is not None:
        passwords.touch(mode=0o600)
        passwords.chmod(0o600)
        passwords.write_text(acl.passwords_text(users))
    if fmt == "aclfile":
        click.echo(acl.aclfile(users), nl=False)
    else:
        # The default user goes off last: redis-cli may be connected as it while applying these.
        click.echo("\n".join([*(u.setuser() for u in users), "ACL SETUSER default off"]))


# Deployment: `fedq k8s ...` and `fedq kfp compile` (click code in fedq/ops/k8s.py).
from fedq.ops.k8s import k8s_group, kfp_group  # noqa: E402

main.add_command(k8s_group)
main.add_command(kfp_group)
