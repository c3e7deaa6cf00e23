"""Terminal output of the CLI (rich): round lines, report tables, run listings."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from fedq.report import build_report
from fedq.store import RunStore, list_runs

console = Console()


def _num(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def print_event(text: str) -> None:
    console.print(f"[dim]{text}[/dim]")


def print_round(total: int, m: dict[str, Any]) -> None:
    """One line per committed round, as it commits."""
    console.print(f"round {m['round']}/{total}: {m['num_updates']} updates, {m['num_examples']} examples, "
                  f"train acc {_num(m.get('train_accuracy'))}, test acc {_num(m.get('test_accuracy'))}, "
                  f"{_num(m.get('seconds'), '.2f')} s")


def rounds_table(rounds: list[dict[str, Any]]) -> Table:
    table = Table(title="rounds")
    for col in ("round", "updates", "examples", "train loss", "train acc", "test loss", "test acc", "seconds",
                "overhead ms"):
        table.add_column(col, justify="right")
    for m in rounds:
        over = m.get("overhead_seconds")
        table.add_row(str(m["round"]), str(m["num_updates"]), str(m["num_examples"]), _num(m.get("train_loss")),
                      _num(m.get("train_accuracy")), _num(m.get("test_loss")), _num(m.get("test_accuracy")),
                      _num(m.get("seconds"), ".2f"), "-" if over is None else f"{over * 1000:.0f}")
    return table


def print_report(report: dict[str, Any], out: Path | None = None) -> None:
    """The per-round table, the final test accuracy and where the files are."""
    console.print(rounds_table(report["rounds"]))
    if report["status"] == "finished":
        f = report["final"]
        console.print(f"[bold]final test accuracy {_num(f['test_accuracy'])}[/bold] "
                      f"(test loss {_num(f['test_loss'])}) — run {report['run_id']} finished")
    else:
        console.print(f"[bold red]run {report['run_id']} {report['status']}[/bold red]: {report.get('reason') or ''}")
    if report.get("refused"):
        console.print(f"{len(report['refused'])} update(s) refused; see report.json")
    if out is not None:
        files = [p.name for p in (out / "report.json", out / "model.keras", out / "scaler.json") if p.exists()]
        console.print(f"wrote {', '.join(files)} to {out}")


def _when(ts: str | None) -> str:
    return "-" if not ts else dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


def print_runs(r: redis.Redis) -> None:
    table = Table(title="runs (newest first)")
    table.add_column("run", no_wrap=True, overflow="ignore")  # ids must stay whole to be copied
    for col in ("status", "clients", "rounds", "created", "final test acc"):
        table.add_column(col)
    for run_id in list_runs(r, limit=50):
        st = RunStore(r, run_id).state()
        final = json.loads(st["final"]).get("test_accuracy") if st.get("final") else None
        table.add_row(run_id, st.get("status", "?"), st.get("clients", "?"),
                      f"{st.get('round', 0)}/{st.get('rounds', '?')}", _when(st.get("created_at")), _num(final))
    console.print(table)


def print_run(r: redis.Redis, run_id: str) -> None:
    store = RunStore(r, run_id)
    report = build_report(store)
    console.print(f"run {run_id}: {report['status']}" + (f" ({report['reason']})" if report.get("reason") else ""))
    table = Table(title="clients")
    for col in ("client", "shard", "rows", "host"):
        table.add_column(col)
    for cid, rec in sorted(store.clients().items()):
        table.add_row(cid, str(rec.get("shard")), str(rec.get("rows")), str(rec.get("host")))
    console.print(table)
    print_report(report)
