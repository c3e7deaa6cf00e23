"""The facts the dashboard, its JSON API and ``fedq status`` show, read from Redis (reads only).

Plain JSON-able dicts: ``runs_overview`` for the list of runs, ``run_detail`` for one run,
``compare`` for runs side by side; what they derive from the records is fedq.ops.dashboard.facts.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from fedq.errors import RunNotFound
from fedq.ops.dashboard import versions
from fedq.ops.dashboard.facts import (
    client_curves,
    client_table,
    finite,
    flatten,
    progress,
    round_row,
    spec_changes,
    test_summary,
    timeline,
)
from fedq.protocol import heartbeat
from fedq.protocol.store import RunStore, list_runs
from fedq.protocol.vocabulary import ENDED
from fedq.roles.plots import commit_times, overfitting

RUNS_LISTED = 100
REFUSED_READ = 1000  # newest refusals read per poll (the log itself keeps up to 10 000)
EVENTS_READ = 5000  # oldest entries of a run's event stream read per poll (the stream keeps up to 10 000)


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
    rows = [round_row(m, finite(m.get("ended_at")) or times.get(m.get("round"))) for m in metrics]  # type: ignore[arg-type]
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
        "client_table": client_table(st, joined, metrics, open_pushed, beats, refused),
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
                     "spec": flatten(spec)})
    keys_all = sorted({k for x in runs for k in x["spec"]} - {"run_id"})
    differ = [k for k in keys_all if len({json.dumps(x["spec"].get(k), sort_keys=True) for x in runs}) > 1]
    return {"runs": [{k: v for k, v in x.items() if k != "spec"} for x in runs],
            "spec_differences": [{"key": k, "values": [x["spec"].get(k) for x in runs]} for k in differ],
            "time": time.time()}


def redis_info(r: redis.Redis) -> dict[str, Any]:
    """Where the dashboard reads from (version only: never the URL, which may hold a password)."""
    info = r.info("server")
    return {"redis_version": info.get("redis_version") or info.get("valkey_version")}


