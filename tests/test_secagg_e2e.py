"""Secure aggregation end to end: the CLI's processes, real Redis.

`fedq run` trains for real (Keras). The protocol's runs (central DP, the exact mean, too many
dropouts) have clients that train with FakeTrainer (tests/support/secagg_client.py --fake-train)
and an aggregator without central evaluation whose run comes with support.initial's model: no
process imports TensorFlow. A client that drops keeps a 2 s heartbeat (the others fedq's 15 s),
so the round sees it gone within seconds rather than waiting out the default. The committed model is checked
against the survivors' plain inputs (which only the clients hold: the test's clients record them),
computed here from first principles; a reader of every key during the run finds none of those
inputs in Redis.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import redis
from support.data import SEED_DATA_MISSING, seed_data_dir
from support.procs import cli_env, fedq_cmd
from support.secagg_checks import (
    RUN,
    Reader,
    assert_model,
    assert_nothing_in_clear,
    envelopes,
    federation,
    recorded,
    tensors,
    wait_all,
)

from fedq.protocol import messages
from fedq.protocol.store import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.skipif(seed_data_dir() is None, reason=SEED_DATA_MISSING)]


def fake_federation(redis_url: str, tmp_path: Path, run_id: str, clients: int, extra: list[str],
                    drops: dict[int, int]) -> dict[str, subprocess.Popen]:
    """support.secagg_checks.federation with no central evaluation, its initial model stored with
    the run, and clients that train with FakeTrainer (0.1 s x (shard + 1) a round); the clients
    that drop have a heartbeat of 2 s."""
    return federation(redis_url, tmp_path, run_id, clients, [*extra, "--no-central-eval"], drops,
                      {k: ["--fake-train"] for k in range(clients)}, prestored=True,
                      client_env={k: {"FEDQ_HEARTBEAT_SECONDS": "2"} for k in drops},
                      FEDQ_TEST_TRAIN_SECONDS="0.1")



def test_fedq_run_with_secure_aggregation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(fedq_cmd("run", "--clients", "3", "--rounds", "2", *RUN, "--out", str(out)),
                          env=cli_env(None), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "finished" and [x["round"] for x in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        sa = row["strategy"]["secure_aggregation"]
        assert sa["survivors"] == sa["sharers"] == sa["roster"] == 3 and sa["dropped"] == []
        assert row["train_loss"] is None  # no client's own loss or accuracy travels in clear
        assert row["num_examples"] > 0  # the capped counts' sum, unmasked with the updates
    assert report["final"]["test_accuracy"] > 0.8


def test_central_dp_on_the_unmasked_sum(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    procs = fake_federation(redis_url, tmp_path, "sa-dp", 3, ["--rounds", "1", "--dp", "central", "--dp-clip", "1",
                                                                 "--dp-noise", "0.1", "--dp-delta", "1e-3"], {})
    wait_all(procs, tmp_path)
    store = RunStore(r, "sa-dp")
    assert store.state()["status"] == "finished", (store.state(), (tmp_path / "aggregator.log").read_text()[-3000:])
    row = store.metrics()[0]
    assert row["strategy"]["secure_aggregation"]["survivors"] == 3
    assert row["num_examples"] == 3000  # each client sent its clipped delta at full weight
    assert row["dp_epsilon"] > 0


def test_exact_mean_with_a_dropout_and_nothing_in_clear(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    reader = Reader(redis_url)
    reader.start()
    # client-3 pushes its masked input of round 2 and vanishes before revealing anything.
    procs = fake_federation(redis_url, tmp_path, "sa-exact", 4, ["--rounds", "2"], {3: 2})
    wait_all(procs, tmp_path)
    reader.done.set()
    reader.join(30)
    store = RunStore(r, "sa-exact")
    state = store.state()
    assert state["status"] == "finished", (state, (tmp_path / "aggregator.log").read_text()[-3000:])
    rounds = store.metrics()
    assert rounds[1]["strategy"]["secure_aggregation"]["survivors"] == 4  # its input is in the sum
    r1, r2 = recorded(tmp_path, 1), recorded(tmp_path, 2)
    assert sorted(r1) == sorted(r2) == [f"client-{k}" for k in range(4)]

    # Round 1's model is the base every client trained round 2 from; round 2's is committed.
    _, _, committed = messages.decode_global(store.global_payload(), "sa-exact")
    assert_model(tensors(r2, "b"), [v["x"] for v in r1.values()], tensors(r1, "b"))
    assert_model([np.asarray(t) for t in committed], [v["x"] for v in r2.values()], tensors(r2, "b"))

    # Nothing any client trained, nor its plain input, was ever in Redis in clear; the reader did
    # read the run (the masked updates and the shares were there while it ran).
    assert any(b":update:" in k for k in reader.keys) and any(b":secagg:2:shares" in k for k in reader.keys)
    assert len(envelopes(reader.updates)) >= 6
    assert_nothing_in_clear(reader, {**{f"{c}/1": v for c, v in r1.items()}, **{f"{c}/2": v for c, v in r2.items()}})
    # The commit deleted every secure-aggregation message of the rounds.
    assert not [k for k in r.scan_iter(match="*secagg*")]


def test_round_fails_beyond_the_dropouts_it_tolerates(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    # 4 clients, each sharing with all 3 others, threshold 3: two drop after their masked input,
    # so only 2 survivors reveal shares, fewer than the 3 that rebuild anyone's self mask.
    procs = fake_federation(redis_url, tmp_path, "sa-fail", 4,
                            ["--rounds", "1", "--secagg-neighbours", "3", "--secagg-threshold", "3"], {2: 1, 3: 1})
    wait_all(procs, tmp_path)
    state = RunStore(r, "sa-fail").state()
    assert state["status"] == "failed", state
    assert "too_few_shares" in state["reason"], state["reason"]
    assert RunStore(r, "sa-fail").committed_round() == 0  # no model was committed
