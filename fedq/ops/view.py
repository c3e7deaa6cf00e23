"""Terminal output of the CLI (rich): round lines, report tables, run listings."""

from __future__ import annotations

import datetime as dt
import os
import sys
import threading
from pathlib import Path
from typing import Any

import redis
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fedq.errors import RunNotFound
from fedq.protocol.store import RunStore

# Logs and pipes are not 80-column terminals: give tables room there unless COLUMNS says otherwise.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 140)


def _num(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def print_event(text: str) -> None:
    console.print(f"[dim]{text}[/dim]")


def print_round(total: int, m: dict[str, Any]) -> None:
    """One line per committed round, as it commits."""
    what = "version" if "version" in m else "round"  # buffered aggregation commits model versions
    console.print(f"{what} {m['round']}/{total}: {m['num_updates']} updates, {m['num_examples']} examples, "
                  f"train acc {_num(m.get('train_accuracy'))}, test acc {_num(m.get('test_accuracy'))}, "
                  f"{_num(m.get('seconds'), '.2f')} s"
                  + (f", ε {m['dp_epsilon']:.3g} (δ {m['dp_delta']:g})" if m.get("dp_epsilon") is not None else "")
                  + (f", staleness mean {m['staleness_mean']:.2f} max {m['staleness_max']}"
                     if "staleness_max" in m else ""))


# Columns shown only when some round has them (binary tasks, federated evaluation, DP).
_OPTIONAL = (("test auc", "test_auc"), ("fed acc", "fed_eval_accuracy"), ("dp ε", "dp_epsilon"),
             ("stale mean", "staleness_mean"), ("stale max", "staleness_max"))
# The same, in few columns (fedq status at 80 columns).
_COMPACT = {"round": "rnd", "updates": "upd", "examples": "ex", "train loss": "tr loss", "train acc": "tr acc",
            "test loss": "te loss", "test acc": "te acc", "test auc": "auc", "fed acc": "fed acc", "dp ε": "ε",
            "seconds": "s", "overhead ms": "ovh ms", "stale mean": "τ mean",
            "stale max": "τ max"}
ROUNDS_SHOWN = 8  # rounds fedq status lists (the newest); the rest are counted


def compact_table(title: str) -> Table:
    """A table in few columns and lines: a rule under the header, no frame, no blank edge lines."""
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False)


def rounds_table(rounds: list[dict[str, Any]], *, compact: bool = False, total: int | None = None) -> Table:
    """The rounds as a table; compact: short headers and no frame (fits 80 columns). total: how many
    rounds there are when rounds is only the newest of them (the title counts the rest)."""
    earlier = (total or len(rounds)) - len(rounds)
    title = f"rounds (last {len(rounds)} of {total}; {earlier} earlier not shown)" if earlier > 0 else "rounds"
    table = compact_table(title) if compact else Table(title=title)
    optional = [(title, key) for title, key in _OPTIONAL if any(m.get(key) is not None for m in rounds)]
    for col in ("round", "updates", "examples", "train loss", "train acc", "test loss", "test acc",
                *(title for title, _ in optional), "seconds", "overhead ms"):
        table.add_column(_COMPACT[col] if compact else col, justify="right", no_wrap=compact)
    for m in rounds:
        over = m.get("overhead_seconds")
        waited = m.get("waited_seconds")
        # A round closed without some client: its overhead leaves out the wait for them (marked *).
        mark = "*" if waited else ""
        table.add_row(str(m["round"]), str(m["num_updates"]), str(m["num_examples"]), _num(m.get("train_loss")),
                      _num(m.get("train_accuracy")), _num(m.get("test_loss")), _num(m.get("test_accuracy")),
                      *(_num(m.get(key)) for _, key in optional),
                      _num(m.get("seconds"), ".1f" if compact else ".2f"),
                      "-" if over is None else f"{over * 1000:.0f}{mark}")
    if any(m.get("waited_seconds") for m in rounds):
        table.caption = "* round closed without a client: overhead excludes the wait for it"
    return table


def print_report(report: dict[str, Any], out: Path | None = None) -> None:
    """The per-round table, the final test accuracy and where the files are."""
    console.print(rounds_table(report["rounds"]))
    if report["status"] == "finished":
        f = report["final"]
        if f.get("test_accuracy") is None and (report.get("spec") or {}).get("central_eval") is False:
            console.print(f"[bold]run {report['run_id']} finished[/bold] (no central evaluation: "
                          f"--no-central-eval)")
        else:
            console.print(f"[bold]final test accuracy {_num(f['test_accuracy'])}[/bold] "
                          f"(test loss {_num(f['test_loss'])}) — run {report['run_id']} finished")
        extras = {k: v for k, v in (report.get("final_evaluation") or {}).items() if isinstance(v, (int, float))}
        if extras:
            console.print("final evaluation: " + ", ".join(f"{k} {_num(v)}" for k, v in extras.items()))
    else:
        console.print(f"[bold red]run {report['run_id']} {report['status']}[/bold red]: {report.get('reason') or ''}")
    dp = report.get("privacy") or {}
    if dp.get("mode") not in (None, "off"):
        eps = dp.get("epsilon")
        console.print(f"differential privacy ({dp['mode']}): ε {'-' if eps is None else f'{eps:.3g}'} at δ "
                      f"{dp['delta']:g} after {dp['rounds']} rounds (clip {dp['clip']:g}, noise multiplier "
                      f"{dp['noise_multiplier']:g})")
    comp = report.get("compression") or {}
    if comp.get("encoding") not in (None, "none") and comp.get("ratio") is not None:
        console.print(f"updates as {comp['encoding']}: tensors {comp['tensor_bytes']:,} bytes, {comp['ratio']:.3f} "
                      f"of float32 ({comp['payload_bytes']:,} bytes with metadata); relative error of the deltas max "
                      f"{_num(comp.get('error_max'), '.2e')}, mean {_num(comp.get('error_mean'), '.2e')}")
    if report.get("refused"):
        console.print(f"{len(report['refused'])} update(s) refused; see report.json")
    if out is not None:
        from fedq.roles.report import written

        files = written(out)
        if report["status"] not in ("finished", "queued", "running"):  # failed: say why, above, not "wrote"
            console.print(f"details in {out / 'report.json'}" if files else "no report was written")
        else:
            console.print(f"wrote {', '.join(files)} to {out}")


def _when(ts: str | float | None) -> str:
    return "-" if not ts else dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


def _short(ts: float | None) -> str:
    """A time in few columns: the clock time today, else the date."""
    if not ts:
        return "-"
    t = dt.datetime.fromtimestamp(ts)
    return t.strftime("%H:%M:%S") if t.date() == dt.date.today() else t.strftime("%Y-%m-%d")


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    secs = max(0.0, now - ts)
    return f"{secs:.0f} s ago" if secs < 60 else f"{secs / 60:.0f} min ago" if secs < 3600 else _when(ts)


_STATUS_STYLE = {"running": "blue", "queued": "yellow", "finished": "green", "failed": "bold red"}
_LIVENESS_STYLE = {"alive": "green", "gone": "bold red", "left": "dim"}


def runs_renderable(overview: dict[str, Any]) -> RenderableType:
    """The runs list and the live aggregators (what the dashboard's front page shows)."""
    table = compact_table("runs (newest first)")
    # Ids must stay whole to be copied: the other columns give way on a narrow terminal.
    table.add_column("run", no_wrap=True, overflow="ignore",
                     min_width=max([len(x["run_id"]) for x in overview["runs"]] + [3]))
    for col in ("status", "clients", "rounds", "started", "finished", "test acc"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("clients", "rounds", "test acc") else "left")
    for run in overview["runs"]:
        status = run["status"] or "?"
        table.add_row(run["run_id"], Text(status, style=_STATUS_STYLE.get(status, "")),
                      f"{run['joined']}/{run['clients']}", f"{run['round']}/{run['rounds']}",
                      _short(run["started_at"]), _short(run["finished_at"]), _num(run["final_test_accuracy"]))
    parts: list[RenderableType] = [table]
    if overview["aggregators"]:
        agg = compact_table("aggregators alive")
        for col in ("name", "host", "pid", "driving", "last heartbeat"):
            agg.add_column(col, no_wrap=col == "name")
        for a in overview["aggregators"]:
            agg.add_row(a["name"], str(a.get("host", "-")), str(a.get("pid", "-")), a.get("run") or "idle",
                        _ago(a.get("time"), overview["time"]))
        parts.append(agg)
    return Group(*parts)


def _span(seconds: float | None) -> str:
    """A duration in few columns: 42 s, 12 min, 3.4 h."""
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def test_line(t: dict[str, Any]) -> str:
    """Latest and best central test metrics: 'test acc 0.91 (best 0.93 @3) · loss ...'."""
    parts = []
    for key, short in (("accuracy", "acc"), ("loss", "loss"), ("auc", "auc"), ("precision", "prec"),
                       ("recall", "rec"), ("f1", "f1")):
        last, best = t["latest"].get(key), t["best"].get(key)
        if last is None:
            continue
        same = best is None or best["round"] == last["round"]
        parts.append(f"{short} {last['value']:.4f}" + ("" if same else f" (best {best['value']:.4f} @{best['round']})"))
    return ("test " + " · ".join(parts)) if parts else ""


def with_staleness(rows: list[dict[str, Any]], versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A buffered run's round rows with each version's staleness (mean, max) beside them."""
    by_version = {v["version"]: v for v in versions}
    return [{**m, **{k: by_version[m["round"]][k] for k in ("staleness_mean", "staleness_max")}}
            if m.get("round") in by_version else m for m in rows]


def run_renderable(d: dict[str, Any], rounds_shown: int = ROUNDS_SHOWN) -> RenderableType:
    """One run: where it stands, its clients (liveness, last push, local metrics), rounds, refusals.

    Fits 80 columns: short headers, the newest rounds_shown rounds with a count of the rest."""
    from fedq.ops.dashboard.facts import phase_text

    now = d["time"]
    ended = d["status"] in ("finished", "failed")
    head = Text(f"run {d['run_id']}: {d['status']}" + (f" ({d['reason']})" if d.get("reason") else ""),
                style="bold " + _STATUS_STYLE.get(d["status"] or "", ""))
    agg = d.get("aggregator") or {}
    driver = agg.get("id") or "-"
    driver += " (alive)" if agg.get("alive") else "" if ended else " (no lease)" if agg.get("id") else ""
    who = (f"clients {d['joined']}/{d['clients']} joined" if ended
           else f"clients {d['alive']}/{d['clients']} alive ({d['joined']} joined)")
    p = d.get("progress") or {}
    timing = f"elapsed {_span(p.get('elapsed_seconds'))}"
    if p.get("eta_seconds") is not None:
        timing += f", ETA {_span(p['eta_seconds'])}"
    started = f"started {_when(d['started_at'])}"
    if d.get("resumed_at"):
        started += f", resumed {_when(d['resumed_at'])}"
    lines = [phase_text(d), f"{who} · {timing}", started + (f", finished {_when(d['finished_at'])}" if ended else ""),
             f"aggregator {driver}"]
    parts: list[RenderableType] = [head, Text("\n".join(lines))]
    tl = test_line(d["test"]) if d.get("test") else ""
    if tl:
        parts.append(Text(tl, style="bold"))
    clients = compact_table("clients")
    for col in ("client", "shard", "liveness", "seen", "pushed", "samples", "loss", "acc", "refused"):
        clients.add_column(col, no_wrap=True, overflow="ellipsis" if col == "client" else "fold",
                           justify="right" if col in ("shard", "pushed", "samples", "loss", "acc", "refused")
                           else "left")
    for c in d["client_table"]:
        # Text, not markup: ids and records may hold whatever a client wrote.
        clients.add_row(Text(c["client_id"]), Text(str(c["shard"])),
                        Text(c["liveness"], style=_LIVENESS_STYLE[c["liveness"]]),
                        _ago(c["last_seen"], now).replace(" ago", ""),
                        "-" if c["last_round"] is None else str(c["last_round"]),
                        Text(str(c["num_examples"] if c["num_examples"] is not None else c.get("rows", "-"))),
                        _num(c["loss"]), _num(c["accuracy"]), str(c["refused"]))
    parts.append(clients)
    rows = with_staleness(d["round_metrics"], d.get("versions") or [])
    if rows:
        parts.append(rounds_table(rows[-rounds_shown:] if rounds_shown else rows, compact=True, total=len(rows)))
    if d["refusals"]:
        refused = compact_table(f"refused updates ({d['refused_total']}, newest last)")
        for col in ("time", "client", "round", "reason", "detail"):
            refused.add_column(col, no_wrap=col != "detail")
        for x in d["refusals"][-5:]:
            refused.add_row(_short(x.get("time")), Text(str(x.get("client"))), Text(str(x.get("round"))),
                            Text(str(x.get("reason"))), Text(str(x.get("detail", ""))))
        parts.append(refused)
    return Group(*parts)


def fit_run(d: dict[str, Any], height: int) -> RenderableType:
    """run_renderable with as many of the newest rounds (ROUNDS_SHOWN at most, one at least) as
    fit in height lines of this console: a watched terminal then keeps the newest round in view."""
    for shown in range(ROUNDS_SHOWN, 1, -1):
        out = run_renderable(d, rounds_shown=shown)
        if len(console.render_lines(out, console.options, pad=False)) <= height:
            return out
    return run_renderable(d, rounds_shown=1)


def status_renderable(r: redis.Redis, run_id: str | None, height: int | None = None) -> RenderableType:
    """What `fedq status` shows: one run (fitted to height lines when given), or the runs list."""
    from fedq.ops.dashboard import snapshot

    if not run_id:
        return runs_renderable(snapshot.runs_overview(r))
    d = snapshot.run_detail(r, run_id)
    return fit_run(d, height) if height else run_renderable(d)


def watch_status(r: redis.Redis, run_id: str | None, interval: float, stop: threading.Event) -> None:
    """Redraw the status every interval seconds until stop is set; rides out Redis going away.

    On a terminal the table is redrawn in place; otherwise it is printed again each time.
    """
    def frame() -> RenderableType:
        stamp = Text(f"{dt.datetime.now():%H:%M:%S} - every {interval:g} s, Ctrl-C to stop", style="dim")
        try:
            # On a terminal the frame is redrawn in place: it must fit, stamp included.
            return Group(status_renderable(r, run_id, console.height - 1 if console.is_terminal else None), stamp)
        except redis.RedisError as exc:
            return Group(Panel(f"Redis is unreachable: {exc}\nretrying every {interval:g} s",
                               title="Redis unreachable", style="bold red"), stamp)
        except RunNotFound as exc:
            return Group(Panel(str(exc), style="yellow"), stamp)

    if console.is_terminal:
        with Live(frame(), console=console, auto_refresh=False, transient=False) as live:
            while not stop.wait(interval):
                live.update(frame(), refresh=True)
    else:
        console.print(frame())
        while not stop.wait(interval):
            console.rule()
            console.print(frame())


class RunProgress:
    """Progress of `fedq run` (joins, rounds, updates in); nothing at all when not a terminal."""

    def __init__(self, rounds: int, clients: int, out: Console | None = None) -> None:
        self.console = out or console
        self.enabled = self.console.is_terminal
        self.rounds, self.clients = rounds, clients
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
                                 transient=True, disable=not self.enabled)
        self.task = self.progress.add_task("starting", total=rounds)

    def __enter__(self) -> RunProgress:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        if self.enabled:
            self.progress.stop()

    def describe(self, state: dict[str, str], joined: int, pushed: int) -> str:
        committed = int(state.get("round") or 0)
        if state.get("phase") in (None, "join"):
            return f"waiting for clients: {joined}/{self.clients} joined"
        if state.get("status") in ("finished", "failed"):
            return f"run {state['status']}"
        return f"round {committed + 1}/{self.rounds}: {pushed}/{self.clients} updates in"

    def update(self, store: RunStore) -> None:
        """Read where the run stands (only when shown) and redraw."""
        if not self.enabled:
            return
        try:
            state = store.state()
            committed = int(state.get("round") or 0)
            joined = store.num_clients()
            pushed = len(store.update_seqs(committed + 1)) if state.get("phase") == "train" else 0
        except redis.RedisError:
            return  # the runner's own loop reports a lost Redis
        self.progress.update(self.task, completed=committed, description=self.describe(state, joined, pushed))
