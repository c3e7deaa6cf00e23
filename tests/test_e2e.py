"""End to end: real processes started the way users start them, real Redis, real training."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from support.data import SEED_DATA_MISSING, iris_csv, seed_data_dir, stale_outputs
from support.fake_client import fake_client_cmd, fake_client_env
from support.procs import ROOT, cli_env, fedq_cmd

from fedq.learning.data import load_dataset, split_indices
from fedq.learning.spec import load_spec
from fedq.protocol import messages
from fedq.protocol.store import RunStore

pytestmark = pytest.mark.slow


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(fedq_cmd(*args), env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _finish(procs: dict[str, subprocess.Popen], logs: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for name, p in procs.items():
        try:
            code = p.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise AssertionError(f"{name} did not finish; log:\n{(logs / f'{name}.log').read_text()}") from None
        assert code == 0, f"{name} exited {code}; log:\n{(logs / f'{name}.log').read_text()}"


def test_aggregator_and_two_clients_through_the_cli(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    env = cli_env(redis_url)
    procs = {}
    # Clients first: they wait for an open run, as pods started before the aggregator would.
    for k in range(2):
        procs[f"client-{k}"] = _start(["client", "--shard", str(k), "--once"], env, tmp_path / f"client-{k}.log")
    time.sleep(1)
    procs["aggregator"] = _start(["aggregator", "--clients", "2", "--rounds", "2", "--run-id", "cli-run"],
                                 env, tmp_path / "aggregator.log")
    _finish(procs, tmp_path)

    store = RunStore(r, "cli-run")
    state = store.state()
    assert state["status"] == "finished" and state["round"] == "2"
    rounds = store.metrics()
    assert [m["round"] for m in rounds] == [1, 2]
    assert all(m["num_updates"] == 2 and sorted(m["clients"]) == ["client-0", "client-1"] for m in rounds)
    # The shards together are exactly the training split: true sample counts, nothing counted twice.
    spec = load_spec(store)
    train, _ = split_indices(load_dataset(spec.data).y, spec.data.test_fraction, spec.data.seed)
    assert rounds[0]["num_examples"] == sum(c["rows"] for c in store.clients().values()) == len(train)
    g_round, _, tensors = messages.decode_global(store.global_payload(), "cli-run")
    assert g_round == 2 and all(np.isfinite(t).all() for t in tensors)
    final = json.loads(state["final"])
    assert final["test_accuracy"] > 0.85

    out = tmp_path / "report"
    done = subprocess.run(fedq_cmd("report", "--run", "cli-run", "--out", str(out)), env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["test_accuracy"] == pytest.approx(final["test_accuracy"])
    assert (out / "model.keras").stat().st_size > 0


def test_submit_then_worker_burst(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    """`fedq submit` queues a run, `fedq aggregator --burst` drives it and exits. What is checked
    here is the queue, not the learning: the run has no central evaluation, and support.fake_client
    stands in for `fedq submit` (its run comes with support.initial's model) and for the clients
    (FakeTrainer for Keras): no process loads TensorFlow."""
    env = cli_env(redis_url)
    fake_env = fake_client_env(env)
    sub = subprocess.run(fake_client_cmd("submit", "--clients", "2", "--rounds", "1", "--local-epochs", "1",
                                         "--no-central-eval"),
                         env=fake_env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    run_id = sub.stdout.strip()
    assert RunStore(r, run_id).state()["status"] == "queued"
    assert RunStore(r, run_id).initial_payload() is not None
    procs = {f"client-{k}": subprocess.Popen(fake_client_cmd("client", "--shard", str(k), "--run", run_id, "--once"),
                                             env=fake_env, stdout=(tmp_path / f"client-{k}.log").open("wb"),
                                             stderr=subprocess.STDOUT) for k in range(2)}
    procs["aggregator"] = _start(["aggregator", "--burst"], env, tmp_path / "aggregator.log")
    _finish(procs, tmp_path)
    assert RunStore(r, run_id).state()["status"] == "finished"
    from fedq.roles.jobs import job_status

    assert job_status(r, run_id) == "finished"


def test_fedq_run_with_its_own_redis(tmp_path: Path) -> None:
    """`fedq run` starts its own Redis, aggregator and clients that train, and replaces an earlier
    run's files in --out with this run's. The data is iris from a CSV (4 features: too narrow for
    the seed network, see test_run_outputs) with the built-in mlp, which trains on it; the seed
    network's model.keras and scaler.json are checked in test_compress_e2e's `fedq run`."""
    csv = iris_csv(tmp_path / "iris.csv")
    out = tmp_path / "out"
    stale_outputs(out)
    done = subprocess.run(fedq_cmd("run", "--model", "mlp", "--csv", str(csv), "--label-column", "species",
                                   "--clients", "2", "--rounds", "3", "--out", str(out)),
                          env=cli_env(None), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "final test accuracy" in done.stdout
    assert "wrote report.json, curves.png, model.keras, scaler.json to" in done.stdout, done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "finished" and report["clients"] == 2 and report["spec"]["model"] == "mlp"
    assert [x["round"] for x in report["rounds"]] == [1, 2, 3]
    for row in report["rounds"]:
        for key in ("num_updates", "num_examples", "train_loss", "train_accuracy", "test_loss",
                    "test_accuracy", "seconds"):
            assert row[key] is not None, key
    assert report["final"]["test_accuracy"] == report["rounds"][-1]["test_accuracy"]
    assert report["final"]["test_accuracy"] >= 0.6, report["rounds"]  # 3 classes: chance is 1/3
    import keras

    model = keras.models.load_model(out / "model.keras")  # this run's: an earlier run's file is no model
    scaler = json.loads((out / "scaler.json").read_text())
    assert model.input_shape == (None, len(scaler["mean"])) == (None, 4)


@pytest.mark.skipif(seed_data_dir() is None, reason=SEED_DATA_MISSING)
@pytest.mark.parametrize("clients", [3])  # the seed's pipeline had 3 data holders; 2 adds no new path
def test_acceptance_hemodialysis(clients: int, tmp_path: Path) -> None:
    data = seed_data_dir()
    done = subprocess.run(
        fedq_cmd("run", "--clients", str(clients), "--rounds", "5", "--normal-csv", str(data / "normal.csv"),
                 "--abnormal-csv", str(data / "abnormal.csv"), "--out", str(tmp_path)),
        env=cli_env(None), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final"]["test_accuracy"] >= 0.95, report["rounds"]
