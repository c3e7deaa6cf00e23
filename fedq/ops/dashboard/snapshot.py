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

from fedq.errors import RunNotFound
from fedq.ops.dashboard import versions
from fedq.protocol import heartbeat
from fedq.protocol.store import RunStore, list_runs
from fedq.protocol.vocabulary import ENDED
from fedq.roles.plots import commit_times, overfitting

RUNS_LISTED = 100
REFUSED_READ = 1000  # newest refusals read per poll (the log itself keeps up to 10 000)
ROUND_FIELDS = ("round", "num_updates", "num_examples", "train_loss", "train_accuracy", "test_loss",
                "test_accuracy", "test_auc", "test_precision", "test_recall", "test_f1", "seconds",
                "overhead_seconds", "eval_seconds", "refused", "dp_epsilon")  # auc...f1: binary tasks; dp: DP runs
CLIENT_METRICS = ("num_examples", "loss", "accuracy", "train_seconds")
# Central test metrics shown as latest and best (auc, precision, recall, f1: binary tasks only).
TEST_METRICS = ("accuracy", "loss", "auc", "precision", "recall", "f1")
LOWER_IS_BETTER = frozenset({"loss"})
EVENTS_READ = 5000  # oldest entries of a run's event stream read per poll (the stream keeps up to 10 000)
ETA_WINDOW = 5  # rounds whose mean duration estimates the time left


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
        # Set when a driver picked the run up again (a restart or a takeover); started_at stays the first start.
        "resumed_at": _num(raw.get("resumed_at")),
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
            "final_test_loss": st["final"]["test_loss"], "resumed_at": st["resumed_at"]}


def runs_overview(r: redis.Redis, limit: int = RUNS_LISTED) -> dict[str, Any]:
    """All runs (newest first, up to limit) and the aggregators that are alive."""
    runs = [s for s in (run_summary(r, run_id) for run_id in list_runs(r, limit=limit)) if s is not None]
    return {"runs": runs, "aggregators": aggregators(r), "time": time.time()}


def _round_row(m: dict[str, Any], ended_at: float | None) -> dict[str, Any]:
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
    over = _time(m.get("overhead_seconds"))
    over = None if over is None else max(0.0, over)  # runs recorded before it was kept at 0 or more
    if not m.get("missing"):
        return over, 0.0 if over is not None else None
    seconds = _time(m.get("seconds"))
    pushed = [(t, c) for c in (m.get("clients") or {}).values()
              if isinstance(c, dict) and (t := _time(c.get("push_time")))]
    if over is None or seconds is None or ended_at is None or not pushed:
        return over, None
    last_push, last = max(pushed, key=lambda pc: pc[0])
    start = ended_at - seconds
    busy = last_push - start - (_time(last.get("train_seconds")) or 0.0) - (_time(last.get("setup_seconds")) or 0.0)
    own = max(0.0, busy) + (_time(m.get("eval_seconds")) or 0.0)
    if own >= over:
        return over, 0.0
    return own, over - own


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
                     "loss": _time(cm.get("loss")), "accuracy": _time(cm.get("accuracy")),
                     "num_examples": _time(cm.get("num_examples"))})
    return out


def aggregator_identity(r: redis.Redis, store: RunStore, st: dict[str, Any],
                        workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Who drives the run, by the id the driver writes into the state (the same before and after
    the run ends): alive while the run goes on and it holds the run's lease; the workers whose
    heartbeat names the run."""
    driver = st["driver"]
    holder = _s(r.get(store.k.lease))
    host = driver.split(":")[0] if driver else None
    return {"id": driver, "host": host, "alive": bool(driver) and holder == driver and st["status"] not in ENDED,
            "lease_holder": holder, "workers": [w["name"] for w in workers]}


_DEFAULTS: dict[str, Any] | None = None


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, name))
        else:
            out[name] = v
    return out


def spec_changes(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The spec as what differs from a default run's spec (run_id aside), clients and rounds always."""
    global _DEFAULTS
    if _DEFAULTS is None:
        from fedq.learning.spec import RunSpec

        _DEFAULTS = _flatten(RunSpec().to_dict())
    flat = _flatten(spec if isinstance(spec, dict) else {})
    out = []
    for k, v in flat.items():
        if k == "run_id":
            continue
        if k in ("clients", "rounds") or k not in _DEFAULTS or _DEFAULTS[k] != v:
            out.append({"key": k, "value": v, "default": _DEFAULTS.get(k)})
    return out


# What the dashboard serves of a finished run (read from Redis, never from disk). It builds no
# model.keras itself (that needs TensorFlow, which it does without): it serves the file the
# aggregator stored with the last round's commit, when there is one.
DOWNLOADS = ("report.json", "curves.png", "model.keras", "scaler.json", "weights.npz")
MODEL_FILE = "model.keras"


def has_model_file(r: redis.Redis, store: RunStore) -> bool:
    """Whether the aggregator stored the run's model.keras (a key of another type: no)."""
    try:
        return bool(r.strlen(store.k.model_file))
    except redis.ResponseError:
        return False


def no_model_file_note(spec: dict[str, Any]) -> str:
    """Why a finished run has no model.keras, and what serves instead."""
    why = ("its aggregator was lean: without central evaluation it never loads TensorFlow, so it had "
           "no Keras model to save" if spec.get("central_eval") is False else
           "its aggregator stored none (the file exceeded its FEDQ_MAX_MODEL_FILE_BYTES, or Keras could not "
           "save the model: see the aggregator's log)")
    return (f"no model.keras for this run: {why}. weights.npz holds the same final weights; "
            "`fedq report --run ID --out DIR` writes model.keras where TensorFlow is installed.")


def downloads(r: redis.Redis, store: RunStore, spec: dict[str, Any], status: str) -> tuple[list[str], str | None]:
    """The files a run offers (none until it finished), and a note when model.keras is not among them."""
    if status != "finished":
        return [], None
    if has_model_file(r, store):
        return list(DOWNLOADS), None
    return [n for n in DOWNLOADS if n != MODEL_FILE], no_model_file_note(spec)


def _spec_and_state(r: redis.Redis, store: RunStore) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's spec and its state as the pages show it; RunNotFound when either is missing."""
    spec = _json(r.get(store.k.spec))
    raw = store.state()
    if spec is None or not raw:
        raise RunNotFound(f"no run {store.run_id!r}")
    return spec, _state(raw)


def run_detail(r: redis.Redis, run_id: str) -> dict[str, Any]:
    """Everything the run page shows; RunNotFound when there is no such run."""
    store = _store(r, run_id)
    spec, st = _spec_and_state(r, store)
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
    events = store.events(EVENTS_READ)
    times = commit_times(events)
    rows = [_round_row(m, _time(m.get("ended_at")) or times.get(m.get("round"))) for m in metrics]  # type: ignore[arg-type]
    files, files_note = downloads(r, store, spec, st["status"])
    now = time.time()
    return {
        "run_id": run_id,
        **st,
        "joined": len(joined),
        # Joined clients with a live heartbeat: a client that died stops counting TTL seconds later.
        "alive": sum(1 for cid in joined if cid in beats),
        "spec": spec,
        "spec_changes": spec_changes(spec),
        "open_round": open_round,
        "round_metrics": rows,
        "test": test_summary(metrics),
        # Test loss rising for some rounds while train loss falls (the same note curves.png draws).
        "overfitting": overfitting(metrics),
        "progress": progress(st, rows, now),
        "events": timeline(metrics, events, all_refused, times),
        "client_curves": client_curves(metrics, times),
        "client_table": _client_table(st, joined, metrics, open_pushed, beats, refused),
        "versions": versions.version_rows(metrics),  # buffered runs: staleness per model version
        "refused_total": refused_total,
        "refusals": refused,
        "aggregators": driving,
        "aggregator": aggregator_identity(r, store, st, driving),
        "downloads": files,
        "downloads_note": files_note,
        "time": now,
    }


def compare(r: redis.Redis, run_ids: list[str]) -> dict[str, Any]:
    """Runs side by side: each run's test curves (by round, and by minutes since its start) and
    the spec settings that are not the same in all of them."""
    runs = []
    for run_id in run_ids:
        store = _store(r, run_id)
        spec, st = _spec_and_state(r, store)
        metrics = store.metrics()
        times = commit_times(store.events(EVENTS_READ))
        runs.append({"run_id": run_id, "status": st["status"], "round": st["round"], "rounds": st["rounds"],
                     "started_at": st["started_at"], "test": test_summary(metrics),
                     "curve": [{"round": m.get("round"), "ended_at": times.get(m.get("round")),  # type: ignore[arg-type]
                                **{f"test_{k}": m.get(f"test_{k}") for k in ("accuracy", "loss")}} for m in metrics],
                     "spec": _flatten(spec)})
    keys_all = sorted({k for x in runs for k in x["spec"]} - {"run_id"})
    differ = [k for k in keys_all if len({json.dumps(x["spec"].get(k), sort_keys=True) for x in runs}) > 1]
    return {"runs": [{k: v for k, v in x.items() if k != "spec"} for x in runs],
            "spec_differences": [{"key": k, "values": [x["spec"].get(k) for x in runs]} for k in differ],
            "time": time.time()}


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
