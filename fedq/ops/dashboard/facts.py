"""What the dashboard and ``fedq status`` derive from a run's records, without Redis: rounds'
rows and overhead, the client table, test summary, progress, the chart's timeline marks,
clients' curves, the spec's changes from the defaults, and a one-line phase (pure functions;
fedq.ops.dashboard.snapshot reads the records and calls them)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from fedq.protocol.vocabulary import ENDED

ROUND_FIELDS = ("round", "num_updates", "num_examples", "train_loss", "train_accuracy", "test_loss",
                "test_accuracy", "test_auc", "test_precision", "test_recall", "test_f1", "seconds",
                "overhead_seconds", "eval_seconds", "refused", "dp_epsilon")  # auc...f1: binary tasks; dp: DP runs
CLIENT_METRICS = ("num_examples", "loss", "accuracy", "train_seconds")
# Central test metrics shown as latest and best (auc, precision, recall, f1: binary tasks only).
TEST_METRICS = ("accuracy", "loss", "auc", "precision", "recall", "f1")
LOWER_IS_BETTER = frozenset({"loss"})
ETA_WINDOW = 5  # rounds whose mean duration estimates the time left


def round_row(m: dict[str, Any], ended_at: float | None) -> dict[str, Any]:
    row = {k: m.get(k) for k in ROUND_FIELDS}
    row["clients"] = sorted(m.get("clients") or {})
    row["ended_at"] = ended_at
    missing = m.get("missing")
    row["missing"] = {str(k): str(v) for k, v in missing.items()} if isinstance(missing, dict) else {}
    row["overhead_recorded"] = m.get("overhead_seconds")
    row["overhead_seconds"], row["waited_seconds"] = round_overhead(m, ended_at)
    return row


def round_overhead(m: dict[str, Any], ended_at: float | None) -> tuple[float | None, float | None]:
    """(overhead, seconds waited for clients that never came) of one committed round.

    The recorded overhead is the round's wall time less the last-arriving client's training;
    in a round closed without some clients (its ``missing``), that includes the wait for them
    (a heartbeat to expire, a deadline). Then the overhead is counted up to the last update
    that came, plus the central evaluation after it: push_time is the client's clock, so the
    split is as good as the clocks agree."""
    over = finite(m.get("overhead_seconds"))
    over = None if over is None else max(0.0, over)  # runs recorded before it was kept at 0 or more
    if not m.get("missing"):
        return over, 0.0 if over is not None else None
    seconds = finite(m.get("seconds"))
    pushed = [(t, c) for c in (m.get("clients") or {}).values()
              if isinstance(c, dict) and (t := finite(c.get("push_time")))]
    if over is None or seconds is None or ended_at is None or not pushed:
        return over, None
    last_push, last = max(pushed, key=lambda pc: pc[0])
    start = ended_at - seconds
    busy = last_push - start - (finite(last.get("train_seconds")) or 0.0) - (finite(last.get("setup_seconds")) or 0.0)
    own = max(0.0, busy) + (finite(m.get("eval_seconds")) or 0.0)
    if own >= over:
        return over, 0.0
    return own, over - own


def client_table(st: dict[str, Any], joined: dict[str, dict[str, Any]],
                   metrics: list[dict[str, Any]], open_pushed: set[str], beats: dict[str, dict[str, Any]],
                   refused: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last: dict[str, tuple[int, dict[str, Any]]] = {}
    for m in metrics:
        for cid, cm in (m.get("clients") or {}).items():
            last[cid] = (int(m["round"]), cm)
    refusals: dict[str, Counter[str]] = {}
    for rec in refused:
        refusals.setdefault(str(rec.get("client")), Counter())[str(rec.get("reason"))] += 1
    ended = st["status"] in ENDED

    def order(cid: str) -> tuple[int, str]:
        shard = joined.get(cid, {}).get("shard")
        return (shard if isinstance(shard, int) else 1 << 30, cid)

    rows = []
    for cid in sorted(set(joined) | set(beats), key=order):
        rec = joined.get(cid, {})
        beat = beats.get(cid)
        last_round, cm = last.get(cid, (None, {}))
        # The last round it pushed: the open round when its update is in, else the heartbeat's
        # word (set after each push), else the last committed round that counted it.
        candidates = [st["round"] + 1 if cid in open_pushed else None, last_round, (beat or {}).get("round")]
        known = [int(x) for x in candidates if isinstance(x, (int, float))]
        pushed = max(known) if known else None
        # Join records and heartbeats are the clients' own writing: only numbers count as times.
        seen = [t for t in (finite(rec.get("joined_at")), cm.get("push_time"), finite((beat or {}).get("time"))) if t]
        row = {
            "client_id": cid,
            "shard": _scalar(rec.get("shard")), "num_shards": _scalar(rec.get("num_shards")),
            "rows": _scalar(rec.get("rows")),
            "host": _scalar(rec.get("host") or (beat or {}).get("host")),
            "pid": _scalar(rec.get("pid") or (beat or {}).get("pid")),
            "joined_at": finite(rec.get("joined_at")),
            "alive": beat is not None,
            # alive: heartbeat present; left: no heartbeat once the run ended; gone: none while it runs.
            "liveness": "alive" if beat is not None else ("left" if ended else "gone"),
            "last_seen": max(seen) if seen else None,
            "last_round": pushed,
            "metrics_round": last_round,
            **{k: cm.get(k) for k in CLIENT_METRICS},
            "refused": sum(refusals.get(cid, Counter()).values()),
            "refused_reasons": dict(refusals.get(cid, Counter())),
        }
        rows.append(row)
    return rows


def finite(value: Any) -> float | None:
    """A client-written timestamp, if it is a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _scalar(value: Any) -> str | int | float | None:
    """A client-written field as a short scalar (nested or long values are not shown)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    return value[:100] if isinstance(value, str) else None


def test_summary(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Latest and best central test metrics over the committed rounds, each with its round.

    best_round: the round of the best test accuracy (the lowest test loss when there is none)."""
    latest: dict[str, Any] = {}
    best: dict[str, Any] = {}
    for m in metrics:
        for k in TEST_METRICS:
            v = m.get(f"test_{k}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            latest[k] = {"value": v, "round": m.get("round")}
            b = best.get(k)
            if b is None or (v < b["value"] if k in LOWER_IS_BETTER else v > b["value"]):
                best[k] = {"value": v, "round": m.get("round")}
    key = "accuracy" if "accuracy" in best else "loss" if "loss" in best else None
    return {"latest": latest, "best": best, "best_round": best[key]["round"] if key else None}


def progress(st: dict[str, Any], rows: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """Elapsed wall time since the first start and, while running, an estimate of the time left
    (the mean of the last few rounds' durations times the rounds to go)."""
    start = st["started_at"]
    end = st["finished_at"] if st["status"] in ENDED and st["finished_at"] else now
    elapsed = max(0.0, end - start) if start else None
    durations = [m["seconds"] for m in rows[-ETA_WINDOW:] if isinstance(m.get("seconds"), (int, float))]
    left = None
    if st["status"] not in ENDED and durations and st["rounds"]:
        left = max(0, st["rounds"] - st["round"]) * sum(durations) / len(durations)
    return {"elapsed_seconds": elapsed, "eta_seconds": left, "eta_at": now + left if left is not None else None,
            "mean_round_seconds": sum(durations) / len(durations) if durations else None}


def timeline(metrics: list[dict[str, Any]], events: list[tuple[float, dict[str, str]]],
             refused: list[dict[str, Any]], times: dict[int, float]) -> list[dict[str, Any]]:
    """What a chart marks: rounds closed by quorum, clients lost and back, driver changes
    (resumes, takeovers), refusals. Each mark has a kind, a round (where it shows on a round
    axis: x.5 between rounds), a time when known, and a text."""
    marks: list[dict[str, Any]] = []
    away: dict[str, int] = {}
    for m in metrics:
        rnd = m.get("round")
        if not isinstance(rnd, int):
            continue
        missing = m.get("missing") if isinstance(m.get("missing"), dict) else {}
        present = set(m.get("clients") or {})
        for cid in sorted(c for c in away if c in present):
            marks.append({"kind": "returned", "round": rnd, "time": times.get(rnd),
                          "text": f"{cid} back in round {rnd} (away since round {away.pop(cid)})", "client": cid})
        if missing:
            marks.append({"kind": "quorum", "round": rnd, "time": times.get(rnd),
                          "text": f"round {rnd} closed without " + ", ".join(f"{c} ({why})" for c, why in
                                                                            sorted(missing.items()))})
            for cid, why in sorted(missing.items()):
                if cid not in away:
                    away[str(cid)] = rnd
                    if "heartbeat" in str(why):
                        marks.append({"kind": "lost", "round": rnd, "time": times.get(rnd),
                                      "text": f"{cid} lost in round {rnd}: {why}", "client": str(cid)})
    committed = 0
    drivers: list[str] = []
    for t, f in events:
        ev = f.get("event")
        if ev == "round" and f.get("round", "").isdigit():
            committed = int(f["round"])
        elif ev == "started":
            d = f.get("driver", "")
            if drivers:
                kind = "takeover" if d != drivers[-1] else "resumed"
                marks.append({"kind": kind, "round": committed + 0.5, "time": t, "driver": d,
                              "text": (f"driver {d} took over" if kind == "takeover" else f"{d} resumed")
                              + f" after round {committed}"})
            drivers.append(d)
    per_round = Counter(int(x["round"]) for x in refused if isinstance(x.get("round"), int))
    for rnd, n in sorted(per_round.items()):
        marks.append({"kind": "refused", "round": rnd, "time": times.get(rnd),
                      "text": f"{n} update(s) refused in round {rnd}"})
    return sorted(marks, key=lambda x: (x["round"], x["kind"]))


def client_curves(metrics: list[dict[str, Any]], times: dict[int, float]) -> dict[str, list[dict[str, Any]]]:
    """Client id -> its local training figures per round it was counted in."""
    out: dict[str, list[dict[str, Any]]] = {}
    for m in metrics:
        for cid, cm in (m.get("clients") or {}).items():
            if isinstance(cm, dict):
                out.setdefault(str(cid), []).append(
                    {"round": m.get("round"), "time": times.get(m.get("round")),  # type: ignore[arg-type]
                     "loss": finite(cm.get("loss")), "accuracy": finite(cm.get("accuracy")),
                     "num_examples": finite(cm.get("num_examples"))})
    return out


_DEFAULTS: dict[str, Any] | None = None


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out


def spec_changes(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The spec as what differs from a default run's spec (run_id aside), clients and rounds always."""
    global _DEFAULTS
    if _DEFAULTS is None:
        from fedq.learning.spec import RunSpec

        _DEFAULTS = flatten(RunSpec().to_dict())
    flat = flatten(spec if isinstance(spec, dict) else {})
    out = []
    for k, v in flat.items():
        if k == "run_id":
            continue
        if k in ("clients", "rounds") or k not in _DEFAULTS or _DEFAULTS[k] != v:
            out.append({"key": k, "value": v, "default": _DEFAULTS.get(k)})
    return out


def phase_text(d: dict[str, Any]) -> str:
    """One line on where a run stands (the run page shows the same words)."""
    if d["status"] == "finished":
        return f"finished: {d['round']} of {d['rounds']} rounds committed"
    if d["status"] == "failed":
        return f"failed after {d['round']} of {d['rounds']} rounds"
    if d.get("phase") in (None, "join"):
        return f"waiting for clients to join: {d['joined']} of {d['clients']} joined"
    if d.get("open_round"):
        o = d["open_round"]
        return (f"round {o['round']} of {d['rounds']} open: {len(o['pushed'])} of {d['clients']} updates in "
                f"({d['round']} committed)")
    return f"{d['phase']}: round {d['round']} of {d['rounds']}"
