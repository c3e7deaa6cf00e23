"""Secure aggregation through a takeover: the aggregator is killed (SIGKILL) once masked inputs are
in and before any unmasking; a plain `fedq aggregator` takes the run over and commits exactly the
survivors' mean -- no client's update in clear anywhere in Redis meanwhile (real processes; the
clients train with FakeTrainer and the run has no central evaluation: only the child that builds
the initial model imports TensorFlow)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import redis
from support.data import SEED_DATA_MISSING, seed_data_dir
from support.procs import Tracker, cli_env, fedq_cmd
from support.secagg_checks import Reader, assert_model, assert_nothing_in_clear, federation, recorded, start, tensors
from support.wait import wait_until

from fedq.protocol import messages
from fedq.protocol.store import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.skipif(seed_data_dir() is None, reason=SEED_DATA_MISSING)]

RUN_ID = "sa-takeover"


@pytest.mark.timeout(600)
def test_a_round_whose_aggregator_dies_before_unmasking_is_finished_exactly(
        redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    env = {"FEDQ_LEASE_SECONDS": "3", "FEDQ_TEST_TRAIN_SECONDS": "0.1"}
    reader = Reader(redis_url)
    reader.start()
    # client-2 holds its masked input back until released, so the round cannot reach unmasking
    # before the kill.
    release = tmp_path / "release-client-2"
    procs = federation(redis_url, tmp_path, RUN_ID, 3, ["--rounds", "1", "--no-central-eval"], {},
                       {0: ["--fake-train"], 1: ["--fake-train"], 2: ["--fake-train", "--hold-push", f"1:{release}"]},
                       **env)
    first = procs["aggregator"]
    first_tree = Tracker(first.pid)
    store = RunStore(r, RUN_ID)

    def tails() -> str:
        return str({p.name: p.read_text(errors="replace")[-1500:] for p in tmp_path.glob("*.log")})
    try:
        wait_until(lambda: len(store.update_seqs(1)) >= 2, "two masked inputs of round 1 stored", 300,
                   every=0.2, detail=tails)
        assert r.get(store.k.secagg_public(1, "sharers")) is not None  # the round got as far as the shares
        assert r.get(store.k.secagg_public(1, "survivors")) is None, "unmasking began before the kill"
        first_tree.scan()
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        for p in first_tree.scan():  # its work horse (the driving process) must not outlive it
            os.kill(p.pid, signal.SIGKILL)
        procs["plain"] = start(fedq_cmd("aggregator"), cli_env(redis_url, **env), tmp_path / "plain.log")
        release.touch()  # client-2's masked input arrives after the takeover
        wait_until(lambda: store.state().get("status") in ("finished", "failed"), "the run ended", 400,
                   every=0.5, detail=tails)
        state = store.state()
        assert state["status"] == "finished", (state, tails())
        assert "resume" in (tmp_path / "plain.log").read_text(), "the plain aggregator did not drive the run"
        row = store.metrics()[0]["strategy"]["secure_aggregation"]
        assert row["survivors"] == 3 and row["adopted"] == ["roster", "sharers"], row
        r1 = recorded(tmp_path, 1)
        assert sorted(r1) == ["client-0", "client-1", "client-2"]
        _, _, committed = messages.decode_global(store.global_payload(), RUN_ID)
        assert_model([np.asarray(t) for t in committed], [v["x"] for v in r1.values()], tensors(r1, "b"))
        for name in ("client-0", "client-1", "client-2"):
            assert procs[name].wait(timeout=120) == 0, (tmp_path / f"{name}.log").read_text()[-2000:]
    finally:
        reader.done.set()
        reader.join(30)
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except Exception:
                p.kill()
        first_tree.kill_all()
    assert_nothing_in_clear(reader, r1)
