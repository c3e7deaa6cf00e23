"""The dashboard's JSON API and pages, served by `fedq dashboard` over real Redis."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support.dashboard import Dashboard, get_json, http_get, make_run
from support.federation import CliFederation
from support.redis import RedisServer
from support.wait import wait_until

from fedq.ops.dashboard.readonly import ReadOnlyRedis, ReadOnlyViolation
from fedq.protocol import heartbeat
from fedq.protocol.store import RunStore
from fedq.roles.report import build_report


@pytest.fixture(scope="module")
def dash(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    d = Dashboard(redis_server.url, tmp_path_factory.mktemp("dashboard"))
    yield d
    d.stop()


def test_runs_list(dash: Dashboard, r: redis.Redis) -> None:
    make_run(r, "older", rounds=2, committed=2)
    make_run(r, "newer", rounds=4, committed=1)
    status, body = get_json(dash.url("/api/runs"))
    assert status == 200
    runs = {x["run_id"]: x for x in body["runs"]}
    assert [x["run_id"] for x in body["runs"]] == ["newer", "older"]  # newest first
    assert runs["older"]["status"] == "finished" and runs["older"]["round"] == 2 and runs["older"]["rounds"] == 2
    assert runs["older"]["final_test_accuracy"] == RunStore(r, "older").metrics()[-1]["test_accuracy"]
    assert runs["older"]["finished_at"] and runs["older"]["started_at"]
    assert runs["newer"]["status"] == "running" and runs["newer"]["round"] == 1 and runs["newer"]["finished_at"] is None
    assert runs["newer"]["joined"] == 2 and runs["newer"]["clients"] == 2
    assert body["aggregators"] == []


def test_run_detail(dash: Dashboard, r: redis.Redis) -> None:
    committed = make_run(r, "detailed", clients=3, rounds=4, committed=2, pushed=("client-2",),
                         refused=(("client-1", 2, "non_finite"), ("client-1", 3, "wrong_shape")))["metrics"]
    hb = heartbeat.client_heartbeat(r, "detailed", "client-0", ttl=30).start()
    try:
        status, d = get_json(dash.url("/api/runs/detailed"))
    finally:
        hb.stop()
    assert status == 200
    assert d["run_id"] == "detailed" and d["status"] == "running" and d["phase"] == "train"
    assert d["round"] == 2 and d["rounds"] == 4 and d["joined"] == 3
    assert d["alive"] == 1 and d["clients"] == 3  # only client-0 keeps a heartbeat
    assert d["open_round"] == {"round": 3, "pushed": ["client-2"]}
    assert d["spec"]["clients"] == 3 and d["spec"]["rounds"] == 4 and d["spec"]["run_id"] == "detailed"
    assert [m["round"] for m in d["round_metrics"]] == [1, 2]
    for got, want in zip(d["round_metrics"], committed):
        for key in ("num_updates", "num_examples", "train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert got[key] == want[key], key
    rows = {c["client_id"]: c for c in d["client_table"]}
    assert [c["client_id"] for c in d["client_table"]] == ["client-0", "client-1", "client-2"]  # by shard
    assert rows["client-0"]["liveness"] == "alive" and rows["client-0"]["alive"] is True
    assert rows["client-1"]["liveness"] == "gone"
    assert rows["client-2"]["last_round"] == 3 and rows["client-0"]["last_round"] == 2  # pushed, committed
    for cid, row in rows.items():
        last = committed[-1]["clients"][cid]
        assert (row["num_examples"], row["loss"], row["accuracy"]) == (last["num_examples"], last["loss"],
                                                                      last["accuracy"])
        assert row["shard"] == int(cid[-1]) and row["host"] == f"site-{cid[-1]}"
    assert rows["client-1"]["refused"] == 2
    assert rows["client-1"]["refused_reasons"] == {"non_finite": 1, "wrong_shape": 1}
    assert d["refused_total"] == 2 and [x["reason"] for x in d["refusals"]] == ["non_finite", "wrong_shape"]
    # each round with a refusal is marked on the charts
    assert [(e["round"], e["text"]) for e in d["events"] if e["kind"] == "refused"] == [
        (2, "1 update(s) refused in round 2"), (3, "1 update(s) refused in round 3")]


def test_unknown_run_is_a_404_page_and_a_json_error(dash: Dashboard, r: redis.Redis) -> None:
    make_run(r, "exists")
    status, body, headers = http_get(dash.url("/runs/nosuchrun"))
    assert status == 404 and headers["Content-Type"].startswith("text/html")
    assert b"Run not found" in body and b"nosuchrun" in body
    assert get_json(dash.url("/api/runs/nosuchrun")) == (404, {"error": "no run 'nosuchrun'", "status": 404})
    status, body = get_json(dash.url("/api/runs/bad%7Bid"))
    assert status == 404 and "invalid run id" in body["error"]
    assert http_get(dash.url("/runs/bad%7Bid"))[0] == 404
    assert get_json(dash.url("/api/nothing-here"))[0] == 404
    assert http_get(dash.url("/no/such/page"))[0] == 404


def test_pages_and_assets_come_from_the_package_not_a_cdn(dash: Dashboard, r: redis.Redis) -> None:
    make_run(r, "paged")
    for path in ("/", "/runs/paged"):
        status, body, headers = http_get(dash.url(path))
        assert status == 200
        html = body.decode()
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs and all(ref.startswith("/") or not re.match(r"^[a-z]+:", ref) for ref in refs), refs
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        for ref in refs:
            if ref.startswith("/static/"):
                assert http_get(dash.url(ref))[0] == 200, ref
    for asset in ("dashboard.js", "charts.js", "dashboard.css"):
        status, body, _ = http_get(dash.url(f"/static/{asset}"))
        assert status == 200 and not re.search(rb"https?://(?!www\.w3\.org/2000/svg)", body), asset


def _commandstats(r: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in r.info("commandstats").items()}


def test_the_dashboard_sends_redis_no_write_command(dash: Dashboard, r: redis.Redis) -> None:
    make_run(r, "watched", clients=2, rounds=3, committed=1, pushed=("client-0",), refused=(("client-1", 1, "x"),))
    beat = heartbeat.aggregator_heartbeat(r, "agg", ttl=30).start()
    beat.stop(delete=False)  # its key stays (until it expires), and no thread writes meanwhile
    before = _commandstats(r)
    for path in ("/", "/runs/watched", "/api/runs", "/api/runs/watched", "/api/runs/nosuchrun", "/api/health"):
        for _ in range(3):
            http_get(dash.url(path))
    after = _commandstats(r)
    used = {name for name, calls in after.items() if calls > before.get(name, 0)} - {"info"}  # ours
    assert {"get", "hgetall", "lrange", "zrevrange", "scan", "strlen", "type", "exists"} <= used, used
    for name in used:
        (doc,) = r.execute_command("COMMAND", "INFO", name).values()  # Redis's own word on the command
        flags = {f.decode() if isinstance(f, bytes) else f for f in doc["flags"]}
        assert "write" not in flags, f"the dashboard sent {name} ({flags})"


def test_read_only_client_refuses_writes_before_they_reach_redis(redis_url: str, r: redis.Redis) -> None:
    ro = ReadOnlyRedis.from_url(redis_url)
    r.set("k", "v")
    assert ro.get("k") == b"v"
    for attempt in (lambda: ro.set("k", "w"), lambda: ro.delete("k"), lambda: ro.hset("h", "a", 1),
                    lambda: ro.pipeline(), lambda: ro.register_script("return 1")(keys=[], args=[]),
                    lambda: RunStore(ro, "any").fail("no"), lambda: ro.pipeline(transaction=False).set("k", "w"),
                    lambda: ro.pipeline(transaction=False).get("k").hset("h", "a", 1)):
        with pytest.raises(ReadOnlyViolation):
            attempt()
    assert r.get("k") == b"v" and not r.exists("h")
    batch = ro.pipeline(transaction=False)  # a batch of reads is allowed, each command checked
    assert batch.get("k").exists("h").execute() == [b"v", 0]


def test_redis_going_away_is_a_503_and_the_api_recovers(tmp_path: Path) -> None:
    server = RedisServer()
    dash = Dashboard(server.url, tmp_path)
    try:
        make_run(redis.Redis.from_url(server.url), "before")
        assert get_json(dash.url("/api/runs/before"))[0] == 200
        server.kill()
        status, body = get_json(dash.url("/api/runs/before"))
        assert status == 503 and body["error"].startswith("Redis is unreachable")
        assert get_json(dash.url("/api/runs"))[0] == 503
        assert http_get(dash.url("/runs/before"))[0] == 200  # the page itself loads and shows a banner
        status, health = get_json(dash.url("/api/health"))
        assert status == 503 and health["ok"] is False and health["redis"] is False
        assert "unreachable" in health["error"]
        server.start()
        make_run(redis.Redis.from_url(server.url), "after")
        status, body = wait_until(lambda: (s := get_json(dash.url("/api/runs")))[0] == 200 and s, "the API to recover",
                                  timeout=15, ignore=(Exception,))
        assert [x["run_id"] for x in body["runs"]] == ["after"]
        assert get_json(dash.url("/api/health")) == (200, {"ok": True, "redis": True})
        assert dash.proc.poll() is None, "the dashboard must survive Redis going away"
    finally:
        dash.stop()
        server.stop()


@pytest.mark.slow
def test_api_during_and_after_a_real_federation(redis_url: str, r: redis.Redis, dash: Dashboard,
                                                tmp_path: Path) -> None:
    # FakeTrainer clients (0.5 s and 1 s a round): the API is what is tested, not the learning.
    fed = CliFederation.driven(redis_url, tmp_path, "live-api", clients=2, rounds=4, train_seconds=0.5)
    seen: list[dict[str, Any]] = []
    driving: set[str] = set()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status, d = get_json(dash.url("/api/runs/live-api"))
            if status == 200:
                seen.append(d)
                driving |= {a["name"] for a in d["aggregators"]}
                if d["status"] in ("finished", "failed"):
                    break
            time.sleep(0.3)
        fed.wait_exit()
    finally:
        fed.close()
    assert seen and seen[-1]["status"] == "finished", seen[-1:] or "the run never appeared"
    # Seen while it ran: training with rounds still to go, progress that only moved forward.
    assert any(s["status"] == "running" and s["phase"] == "train" and s["round"] < 4 for s in seen)
    assert [s["round"] for s in seen] == sorted(s["round"] for s in seen)
    assert len({s["round"] for s in seen}) >= 3, "the API should show rounds as they commit"
    assert driving, "the aggregator worker's heartbeat should name the run it drives"

    final = seen[-1]
    report = build_report(RunStore(r, "live-api"))
    assert final["final"] == report["final"]
    assert [m["round"] for m in final["round_metrics"]] == [m["round"] for m in report["rounds"]] == [1, 2, 3, 4]
    for got, want in zip(final["round_metrics"], report["rounds"]):
        for key in ("num_updates", "num_examples", "train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert got[key] == want[key], (key, got, want)
    last = RunStore(r, "live-api").metrics()[-1]
    rows = {c["client_id"]: c for c in final["client_table"]}
    assert sorted(rows) == report["rounds"][-1]["clients"]
    assert sum(c["num_examples"] for c in rows.values()) == report["rounds"][-1]["num_examples"]
    for cid, row in rows.items():
        assert row["last_round"] == 4 and row["liveness"] in ("left", "alive")
        assert (row["loss"], row["accuracy"]) == (last["clients"][cid]["loss"], last["clients"][cid]["accuracy"])
    status, listing = get_json(dash.url("/api/runs"))
    (run,) = [x for x in listing["runs"] if x["run_id"] == "live-api"]
    assert run["status"] == "finished" and run["final_test_accuracy"] == report["final"]["test_accuracy"]
    _model_keras_is_the_final_model(dash, r, tmp_path, final)


def _model_keras_is_the_final_model(dash: Dashboard, r: redis.Redis, tmp_path: Path, final: dict[str, Any]) -> None:
    """The finished run's model.keras download, as the aggregator stored it, loads in Keras
    and holds the last global model."""
    import keras
    import numpy as np

    from fedq.protocol import transfer

    assert "model.keras" in final["downloads"] and final["downloads_note"] is None, final["downloads"]
    status, body, headers = http_get(dash.url("/runs/live-api/files/model.keras"))
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Disposition"] == 'attachment; filename="live-api-model.keras"'
    (tmp_path / "model.keras").write_bytes(body)
    model = keras.models.load_model(tmp_path / "model.keras")
    round_no, _, tensors = transfer.read_global(RunStore(r, "live-api"))
    assert round_no == 4 and len(model.get_weights()) == len(tensors)
    for got, want in zip(model.get_weights(), tensors):
        np.testing.assert_array_equal(got, want)


def test_downloads_of_a_finished_run_are_built_from_redis(dash: Dashboard, r: redis.Redis) -> None:
    import io
    import json

    import numpy as np

    from fedq.protocol import messages

    make_run(r, "downloaded", rounds=2, committed=2)
    store = RunStore(r, "downloaded")
    # a real global model and scaler, as the aggregator writes them
    tensors = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, dtype=np.float32)]
    r.set(store.k.global_model, messages.encode_global("downloaded", 2, ["dense/kernel", "dense/bias"], tensors))
    r.set(store.k.scaler, messages.encode_scaler(np.zeros(3), np.ones(3), {"num_features": 3, "num_classes": 2,
                                                                           "class_names": ["a", "b"]}))
    status, d = get_json(dash.url("/api/runs/downloaded"))
    # no model.keras: this made-up run's aggregator stored none (tests/test_model_file.py serves one)
    assert d["downloads"] == ["report.json", "curves.png", "scaler.json", "weights.npz"]
    assert "FEDQ_MAX_MODEL_FILE_BYTES" in d["downloads_note"] and "weights.npz" in d["downloads_note"]
    status, body, headers = http_get(dash.url("/runs/downloaded/files/report.json"))
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    assert json.loads(body)["rounds"] == build_report(store)["rounds"]
    status, body, headers = http_get(dash.url("/runs/downloaded/files/curves.png"))
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n" and headers["Content-Type"] == "image/png"
    status, timed, _ = http_get(dash.url("/runs/downloaded/files/curves.png?axis=time"))
    assert status == 200 and timed[:8] == b"\x89PNG\r\n\x1a\n" and timed != body  # minutes, not rounds
    status, body, _ = http_get(dash.url("/runs/downloaded/files/scaler.json"))
    assert status == 200 and json.loads(body)["class_names"] == ["a", "b"]
    status, body, _ = http_get(dash.url("/runs/downloaded/files/weights.npz"))
    w = np.load(io.BytesIO(body))
    assert status == 200 and list(w["names"]) == ["dense/kernel", "dense/bias"] and int(w["round"]) == 2
    assert np.array_equal(w["0"], tensors[0]) and np.array_equal(w["1"], tensors[1])
    # a running run offers nothing yet; unknown names and runs are errors naming what was wrong
    make_run(r, "not-done", rounds=3, committed=1)
    assert get_json(dash.url("/api/runs/not-done"))[1]["downloads"] == []
    status, err = get_json(dash.url("/runs/not-done/files/report.json"))
    assert status == 409 and "running" in err["error"]
    status, err = get_json(dash.url("/runs/downloaded/files/secrets.txt"))
    assert status == 404 and "secrets.txt" in err["error"]
    assert get_json(dash.url("/runs/nosuch/files/report.json"))[0] == 404


def test_compare_overlays_test_curves_and_lists_spec_differences(dash: Dashboard, r: redis.Redis) -> None:
    from fedq.learning.spec import RunSpec

    make_run(r, "cmp-a", clients=2, rounds=3, committed=3)
    store = RunStore(r, "cmp-b")
    store.create(RunSpec(clients=2, rounds=3, run_id="cmp-b", learning_rate=0.001))
    status, d = get_json(dash.url("/api/compare?runs=cmp-a,cmp-b"))
    assert status == 200
    assert [x["run_id"] for x in d["runs"]] == ["cmp-a", "cmp-b"]
    a = RunStore(r, "cmp-a").metrics()
    assert [m["test_accuracy"] for m in d["runs"][0]["curve"]] == [m["test_accuracy"] for m in a]
    assert d["runs"][1]["curve"] == []
    assert d["spec_differences"] == [{"key": "learning_rate", "values": [0.01, 0.001]}]
    assert get_json(dash.url("/api/compare?runs=cmp-a"))[0] == 400
    assert get_json(dash.url("/api/compare?runs=cmp-a,nosuch"))[0] == 404
    status, body, _ = http_get(dash.url("/compare?runs=cmp-a,cmp-b"))
    assert status == 200 and b"Compare runs" in body
