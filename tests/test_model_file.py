"""The final model as model.keras in Redis: the aggregator stores it with the last round's
commit (when it holds the Keras model and the file fits FEDQ_MAX_MODEL_FILE_BYTES) and the
dashboard serves it, read-only."""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import redis
from support.dashboard import make_run
from support.federation import noisy, wait_committed

from fedq.ops.dashboard import snapshot
from fedq.ops.dashboard.app import create_app
from fedq.ops.dashboard.readonly import ReadOnlyRedis
from fedq.protocol.store import RunStore


def _zip(name: str = "config.json", text: str = "{}") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, text)
    return buf.getvalue()


def _finish(h) -> None:
    """Push one update per client for each round and wait until the run finished."""
    for round_no in range(1, h.spec.rounds + 1):
        _, _, g = h.global_model()
        for k in range(h.spec.clients):
            assert h.push_tensors(f"c{k}", round_no, noisy(g, seed=10 * round_no + k), 50 + k) == "ok"
        wait_committed(h.store, round_no)
    h.thread.join(timeout=60)
    assert h.store.state()["status"] == "finished", h.store.state()


@pytest.mark.slow
def test_the_aggregator_commits_model_keras_and_the_dashboard_serves_a_file_keras_loads(
        harness_factory, r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    import keras

    h = harness_factory(2, "t-model-file")
    _finish(h)
    _, _, final = h.global_model()
    client = create_app(ReadOnlyRedis.from_url(redis_url)).test_client()
    resp = client.get("/runs/t-model-file/files/model.keras")
    assert resp.status_code == 200 and resp.mimetype == "application/octet-stream"
    assert resp.headers["Content-Disposition"] == 'attachment; filename="t-model-file-model.keras"'
    (tmp_path / "model.keras").write_bytes(resp.data)
    model = keras.models.load_model(tmp_path / "model.keras")
    assert len(model.get_weights()) == len(final)
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_array_equal(got, want)  # the committed global model, not a round before
    assert model.optimizer is not None  # compiled with the run's optimizer: ready to train on
    detail = snapshot.run_detail(ReadOnlyRedis.from_url(redis_url), "t-model-file")
    assert "model.keras" in detail["downloads"] and detail["downloads_note"] is None


@pytest.mark.slow
def test_a_model_file_over_the_cap_is_not_stored_and_the_run_still_finishes(
        harness_factory, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fedq.roles.aggregator")
    h = harness_factory(1, "t-model-cap", max_model_file_bytes=1024)
    _finish(h)
    assert RunStore(h.store.r, "t-model-cap").model_file() is None
    assert "exceed FEDQ_MAX_MODEL_FILE_BYTES=1024" in caplog.text
    detail = snapshot.run_detail(ReadOnlyRedis.from_url(redis_url), "t-model-cap")
    assert "model.keras" not in detail["downloads"] and "FEDQ_MAX_MODEL_FILE_BYTES" in detail["downloads_note"]


def test_a_lean_run_offers_weights_npz_instead_with_a_note(r: redis.Redis, redis_url: str) -> None:
    make_run(r, "lean-run", rounds=1, committed=1, central_eval=False)
    ro = ReadOnlyRedis.from_url(redis_url)
    detail = snapshot.run_detail(ro, "lean-run")
    assert detail["downloads"] == ["report.json", "curves.png", "scaler.json", "weights.npz"]
    assert "lean" in detail["downloads_note"] and "weights.npz" in detail["downloads_note"]
    resp = create_app(ro).test_client().get("/runs/lean-run/files/model.keras")
    assert resp.status_code == 404
    assert "lean" in resp.json["error"] and "weights.npz" in resp.json["error"]


def test_a_stored_model_file_is_served_byte_for_byte_and_only_when_it_is_one(r: redis.Redis, redis_url: str) -> None:
    data = _zip()
    make_run(r, "with-file", rounds=2, committed=2, model_file=data)
    ro = ReadOnlyRedis.from_url(redis_url)
    client = create_app(ro).test_client()
    assert snapshot.run_detail(ro, "with-file")["downloads"] == list(snapshot.DOWNLOADS)
    resp = client.get("/runs/with-file/files/model.keras")
    assert resp.status_code == 200 and resp.data == data
    assert resp.headers["Content-Disposition"] == 'attachment; filename="with-file-model.keras"'
    # Committed with the last round only: a running run has none, and offers nothing yet.
    make_run(r, "running", rounds=3, committed=2, model_file=data)
    assert r.exists(RunStore(r, "running").k.model_file) == 0
    assert client.get("/runs/running/files/model.keras").status_code == 409
    # Not a .keras file (no zip archive), or not a string at all: none, with the note.
    store = RunStore(r, "with-file")
    r.set(store.k.model_file, b"not a zip")
    resp = client.get("/runs/with-file/files/model.keras")
    assert resp.status_code == 404 and "weights.npz" in resp.json["error"]
    r.delete(store.k.model_file)
    r.hset(store.k.model_file, "x", "y")
    assert "model.keras" not in snapshot.run_detail(ro, "with-file")["downloads"]
    assert client.get("/runs/with-file/files/model.keras").status_code == 404


@pytest.mark.slow
def test_a_buffered_run_commits_model_keras_with_its_last_version(harness_factory, tmp_path: Path) -> None:
    import keras

    h = harness_factory(2, "t-model-file-buffered",
                        spec_extra={"aggregation": "buffered", "buffer_size": 2, "max_staleness": 1})
    for version in (1, 2):
        _, names, g = h.global_model()
        for k in range(2):
            payload = h.update(f"c{k}", version, 50 + k, noisy(g, seed=10 * version + k), names)
            assert h.store.push_update(f"c{k}", version, payload, h.settings.max_update_bytes, window=1) == "ok"
        wait_committed(h.store, version)
        if version == 1:
            assert h.store.model_file() is None  # only the version that ends training carries the file
    h.thread.join(timeout=60)
    assert h.store.state()["status"] == "finished", h.store.state()
    data = h.store.model_file()
    assert data is not None
    (tmp_path / "model.keras").write_bytes(data)
    _, _, final = h.global_model()
    for got, want in zip(keras.models.load_model(tmp_path / "model.keras").get_weights(), final, strict=True):
        np.testing.assert_array_equal(got, want)
