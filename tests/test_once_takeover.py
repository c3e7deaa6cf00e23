"""A run made by `fedq aggregator --clients N` lives on a queue of its own; when its driver dies, a
plain `fedq aggregator` on the default queue takes it over and finishes it (real processes).

What is tested is the queue and the takeover, not the learning: the run has no central evaluation,
its clients train with FakeTrainer and the one-shot aggregator is support.fake_client's (its run
comes with support.initial's model): no process loads TensorFlow."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis
from support.fake_client import fake_client_cmd, fake_client_env
from support.procs import Tracker, cli_env, fedq_cmd
from support.wait import wait_until

from fedq.protocol.store import RunStore

RUN = "once-then-plain"
ROUNDS = 4


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait(what: str, check, timeout: float, logs: Path) -> None:
    def tails() -> str:
        return str({p.name: p.read_text(errors="replace")[-2000:] for p in logs.glob("*.log")})
    wait_until(check, what, timeout, every=0.2, detail=tails)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plain_aggregator_takes_over_a_one_shot_run_whose_driver_died(redis_url: str, r: redis.Redis,
                                                                      tmp_path: Path) -> None:
    env = fake_client_env(dict(cli_env(redis_url), FEDQ_LEASE_SECONDS="3"), seconds=0.5)
    store = RunStore(r, RUN)
    once = _start(fake_client_cmd("aggregator", "--clients", "2", "--rounds", str(ROUNDS), "--local-epochs", "1",
                                  "--no-central-eval", "--run-id", RUN), env, tmp_path / "once.log")
    once_tree = Tracker(once.pid)
    procs = [once]
    try:
        _wait("the one-shot run was created", lambda: store.state().get("queue"), 60, tmp_path)
        assert store.state()["queue"] == f"fedq-once-{RUN}"
        procs += [_start(fake_client_cmd("client", "--shard", str(k), "--run", RUN, "--once"), env,
                         tmp_path / f"client-{k}.log") for k in range(2)]
        _wait("round 1 committed", lambda: int(store.state().get("round") or 0) >= 1, 180, tmp_path)
        once_tree.scan()  # the worker and its work horse
        os.kill(once.pid, signal.SIGKILL)  # the driver dies; its work horse must go with it
        once.wait(timeout=10)
        _wait("the one-shot driver's work horse ended", lambda: not once_tree.scan(), 5, tmp_path)
        stopped_at = int(store.state()["round"])
        assert stopped_at < ROUNDS, "the run ended before its driver was killed; nothing to take over"

        plain = _start(fedq_cmd("aggregator"), env, tmp_path / "plain.log")
        procs.append(plain)
        _wait("the plain aggregator finished the run",
              lambda: store.state().get("status") in ("finished", "failed"), 180, tmp_path)
        state = store.state()
        assert state["status"] == "finished", state
        assert int(state["round"]) == ROUNDS
        assert state["queue"] == "fedq-runs", "the run moved to the queue of the worker that took it over"
        assert "resume" in (tmp_path / "plain.log").read_text(), "the plain aggregator did not drive it"
        for client in procs[1:3]:
            assert client.wait(timeout=60) == 0, (tmp_path / "client-0.log").read_text()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        once_tree.kill_all()
