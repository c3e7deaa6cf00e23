"""The facts the dashboard, its JSON API and ``fedq status`` show, read from Redis (reads only).

Plain JSON-able dicts: ``runs_overview`` for the list of runs, ``run_detail`` for one run.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import Any

import redis

from fedq.protocol import heartbeat
from fedq.errors import RunNotFound
from fedq.protocol.store import RunStore, list_runs
from fedq.protocol.vocabulary import ENDED

RUNS_LISTED = 100
REFUSED_READ = 1000  # newest refusals read per poll (the log itself keeps up to 10 000)
ROUND_FIELDS = ("round", "num_updates", "num_examples", "train_loss", "train_accuracy", "test_loss",
                "test_accuracy", "seconds", "overhead_seconds", "refused", "dp_epsilon")  # dp_epsilon: DP runs
CLIENT_METRICS = ("num_examples", "loss", "accuracy", "train_seconds")


def _s(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


def _num(v: str | None, kind: type = float) -> Any:
    if v in (None, ""):
        return None
    try:
        return kind(float(v)) if kind is int else kind(v)
    except ValueError:
        return None


def _json(raw: str | bytes | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _state(raw: dict[str, str]) -> dict[str, Any]:
    """The state hash with numbers as numbers and the final result parsed."""
    final = _json(raw.get("final")) or {}
    return {
        "status": raw.get("status"),
        "phase": raw.get("phase"),
        "round": _num(raw.get("round"), int) or 0,
        "rounds": _num(raw.get("rounds"), int),
        "clients": _num(raw.get("clients"), int),
        "created_at": _num(raw.get("created_at")),
        "started_at": _num(raw.get("started_at")),
        "finished_at": _num(raw.get("finished_at")),
        "updated_at": _num(raw.get("updated_at")),
        "reason": raw.get("reason") or None,
        "driver": raw.get("driver") or None,
        "final": {"test_accuracy": final.get("test_accuracy"), "test_loss": final.get("test_loss")},
    }


def _store(r: redis.Redis, run_id: str) -> RunStore:
    return RunStore(r, run_id)  # ConfigError for an id that cannot exist (the web app makes it a 404)


def aggregators(r: redis.Redis) -> list[dict[str, Any]]:
    """Aggregators with a live heartbeat, by name."""
    return [{"name": name, **rec} for name, rec in sorted(heartbeat.alive_aggregators(r).items())]


def run_summary(r: redis.Redis, run_id: str) -> dict[str, Any] | None:
    """One row of the runs list (None when the run has vanished)."""
    store = _store(r, run_id)
    raw = store.state()
    if not raw:
        return None
    st = _state(raw)
    return {"run_id": run_id, **{k: st[k] for k in ("status", "phase", "round", "rounds", "clients",
                                                     "created_at", "started_at", "finished_at", "reason")},
            "joined": store.num_clients(), "final_test_accuracy": st["final"]["test_accuracy"],
            "final_test_loss": st["final"]["test_loss"]}


def runs_overview(r: redis.Redis, limit: int = RUNS_LISTED) -> dict[str, Any]:
    """All runs (newest first, up to limit) and the aggregators that are alive."""
    runs = [s for s in (run_summary(r, run_id) for run_id in list_runs(r, limit=limit)) if s is not None]
    return {"runs": runs, "aggregators": aggregators(r), "time": time.time()}


def _round_row(m: dict[str, Any]) -> dict[str, Any]:
    row = {k: m.get(k) for k in ROUND_FIELDS}
    row["clients"] = sorted(m.get("clients") or {})
    return row


def _client_table(st: dict[str, Any], joined: dict[str, dict[str, Any]],
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
        seen = [t for t in (_time(rec.get("joined_at")), cm.get("push_time"), _time((beat or {}).get("time"))) if t]
        row = {
            "client_id": cid,
            "shard": _scalar(rec.get("shard")), "num_shards": _scalar(rec.get("num_shards")),
            "rows": _scalar(rec.get("rows")),
            "host": _scalar(rec.get("host") or (beat or {}).get("host")),
            "pid": _scalar(rec.get("pid") or (beat or {}).get("pid")),
            "joined_at": _time(rec.get("joined_at")),
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


def _time(value: Any) -> float | None:
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


def run_detail(r: redis.Redis, run_id: str) -> dict[str, Any]:
    """Everything the run page shows; RunNotFound when there is no such run."""
    store = _store(r, run_id)
    spec = _json(r.get(store.k.spec))
    raw = store.state()
    if spec is None or not raw:
        raise RunNotFound(f"no run {run_id!r}")
    st = _state(raw)
    joined = store.clients()
    metrics = store.metrics()
    open_round = None
    open_pushed: set[str] = set()
    if st["status"] not in ENDED and st["phase"] == "train":
        open_pushed = {cid for cid, seq in store.update_seqs(st["round"] + 1).items() if seq.isdigit()}
        open_round = {"round": st["round"] + 1, "pushed": sorted(open_pushed)}
    all_refused = store.refused()
    refused_total = len(all_refused)
    refused = all_refused[-REFUSED_READ:]
    beats = heartbeat.client_heartbeats(r, run_id, sorted(joined))
    driving = [a for a in aggregators(r) if a.get("run") == run_id]
    return {
        "run_id": run_id,
        **st,
        "joined": len(joined),
        # Joined clients with a live heartbeat: a client that died stops counting TTL seconds later.
        "alive": sum(1 for cid in joined if cid in beats),
        "spec": spec,
        "open_round": open_round,
        "round_metrics": [_round_row(m) for m in metrics],
        "client_table": _client_table(st, joined, metrics, open_pushed, beats, refused),
        "refused_total": refused_total,
        "refusals": refused,
        "aggregators": driving,
        "time": time.time(),
    }


def redis_info(r: redis.Redis) -> dict[str, Any]:
    """Where the dashboard reads from (version only: never the URL, which may hold a password)."""
    info = r.info("server")
    return {"redis_version": info.get("redis_version") or info.get("valkey_version")}


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
