"""What commands make of their options (settings, data and run specs, stragglers) and the stop signal."""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Literal, overload

import click

from fedq.learning.dataspec import DataSpec, seed_spec
from fedq.settings import Settings

if TYPE_CHECKING:
    from fedq.learning.spec import RunSpec


def settings_of(ctx: click.Context) -> Settings:
    """The Settings the `fedq` group built from --redis-url, --log-level and FEDQ_* variables."""
    settings: Settings = ctx.obj["settings"]
    return settings


def stop_on_signals() -> threading.Event:
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


@overload
def data_spec(normal_csv: str | None, abnormal_csv: str | None, csv_path: str | None,
              label_column: str | None, missing_value: float | None, test_fraction: float | None,
              seed: int, default: Literal[True]) -> DataSpec: ...


@overload
def data_spec(normal_csv: str | None, abnormal_csv: str | None, csv_path: str | None,
              label_column: str | None, missing_value: float | None, test_fraction: float | None,
              seed: int, default: bool) -> DataSpec | None: ...


def data_spec(normal_csv: str | None, abnormal_csv: str | None, csv_path: str | None,
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


def stragglers_from(kw: dict[str, Any]) -> tuple[int, float]:
    """(M, delay) from --straggler-clients and --straggler-delay, checked against --clients."""
    count, delay = kw.pop("straggler_clients"), kw.pop("straggler_delay")
    if count > (kw.get("clients") or 0):
        raise click.BadParameter(f"{count} is more than the {kw.get('clients')} clients",
                                 param_hint="--straggler-clients")
    if count and not delay:
        raise click.BadParameter("stragglers need a delay", param_hint="--straggler-delay")
    return count, delay


def run_spec_from(kw: dict[str, Any]) -> RunSpec:
    """The RunSpec of a command's run options (run_options), popped from kw; the rest go to RunSpec as given."""
    import dataclasses

    from fedq.learning.models import resolve_model_arg
    from fedq.learning.spec import RunSpec, new_run_id
    from fedq.learning.strategies import StrategySpec

    data = data_spec(kw.pop("normal_csv"), kw.pop("abnormal_csv"), kw.pop("csv_path"), kw.pop("label_column"),
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
