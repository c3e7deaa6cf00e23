"""The options commands share: the data, the run's definition (strategy, privacy, aggregation), stragglers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from fedq.learning.choices import OPTIMIZERS
from fedq.protocol.vocabulary import ENCODINGS


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
