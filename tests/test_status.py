"""`fedq status [--run ID] [--watch]`, and the progress display `fedq run` uses on a terminal."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import redis
from rich.console import Console
from support.dashboard import make_run
from support.procs import cli_env, fedq_cmd
from support.redis import RedisServer

from fedq.ops.view import RunProgress
from fedq.protocol import heartbeat
from fedq.protocol.fencing import Commit
from fedq.protocol.store import RunStore


def _env(redis_url: str) -> dict[str, str]:
    env = cli_env(redis_url)
    env["COLUMNS"] = "200"  # wide enough that no cell is cut short
    return env


def status(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(fedq_cmd("status", *args), env=_env(redis_url), capture_output=True, text=True, timeout=60)


def test_status_lists_runs_with_clients_rounds_and_final_accuracy(redis_url: str, r: redis.Redis) -> None:
    make_run(r, "done-run", rounds=2, committed=2)
    make_run(r, "busy-run", rounds=5, committed=1)
    proc = status(redis_url)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip().startswith(("done-", "busy-"))}
    assert "finished" in lines["done-run"] and "2/2" in lines["done-run"]
    assert "running" in lines["busy-run"] and "1/5" in lines["busy-run"]
    final = RunStore(r, "done-run").metrics()[-1]["test_accuracy"]
    assert f"{final:.4f}" in lines["done-run"]


def test_status_of_a_run_shows_clients_liveness_pushes_and_refusals(redis_url: str, r: redis.Redis) -> None:
    make_run(r, "one-run", rounds=3, committed=1, pushed=("client-0",), refused=(("client-1", 1, "non_finite"),))
    hb = heartbeat.client_heartbeat(r, "one-run", "client-0", ttl=30).start()
    try:
        proc = status(redis_url, "--run", "one-run")
    finally:
        hb.stop()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "run one-run: running" in out
    assert "round 2 of 3 open: 1 of 2 updates in (1 committed)" in out
    assert "clients 1/2 alive (2 joined)" in out  # client-1 joined but has no heartbeat
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith("client-")}
    # client, shard, liveness, last seen ("N s"), last round pushed, samples, ...
    assert rows["client-0"][1:3] == ["0", "alive"] and rows["client-0"][4:6] == ["s", "2"]  # pushed round 2
    assert rows["client-1"][1:3] == ["1", "gone"] and rows["client-1"][5] == "1"
    assert "non_finite" in out and "refused updates (1" in out


def _read_until(proc: subprocess.Popen, text: str, timeout: float, seen: list[str]) -> None:
    """Read proc's stdout (non-blocking) until text appears in it."""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while text not in "".join(seen):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"no {text!r} in output:\n{''.join(seen)[-3000:]}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            seen.append(os.read(fd, 65536).decode(errors="replace"))


def test_status_watch_follows_the_run_and_rides_out_redis_going_away(tmp_path: Path) -> None:
    server = RedisServer()
    try:
        r = redis.Redis.from_url(server.url)
        make_run(r, "watched", rounds=3, committed=1)
        proc = subprocess.Popen(fedq_cmd("status", "--run", "watched", "--watch", "--interval", "0.3"),
                                env=_env(server.url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen: list[str] = []
        try:
            _read_until(proc, "run watched: running", 30, seen)
            store = RunStore(r, "watched")
            store.acquire_lease("test-driver-2", 60) or r.set(store.k.lease, "test-driver-2")
            store.driver = "test-driver-2"
            store.commit_round(Commit(round=2, global_payload=b"g2", metrics={
                "round": 2, "num_updates": 2, "num_examples": 201, "test_accuracy": 0.9, "clients": {}}))
            _read_until(proc, "(2 committed)", 10, seen)  # the new round shows without a restart
            server.kill()
            seen.clear()
            _read_until(proc, "Redis is unreachable", 15, seen)
            assert proc.poll() is None, "status --watch must not exit when Redis goes away"
            server.start()  # same port, empty (nothing on disk): the run is written again
            seen.clear()
            _read_until(proc, "no run 'watched'", 20, seen)  # Redis answers again
            make_run(redis.Redis.from_url(server.url), "watched", rounds=3, committed=2)
            seen.clear()
            _read_until(proc, "(2 committed)", 20, seen)
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=15)
        assert code == 0
    finally:
        server.stop()


def test_watch_of_a_vanished_run_says_so(redis_url: str) -> None:
    proc = status(redis_url, "--run", "nosuchrun", "--watch")
    assert proc.returncode == 1 and "no run 'nosuchrun'" in proc.stderr  # unknown at start: an error, not a loop


def test_run_progress_shows_joins_and_updates_on_a_terminal_only(r: redis.Redis) -> None:
    make_run(r, "progressing", rounds=3, committed=1, pushed=("client-1",))
    store = RunStore(r, "progressing")
    tty = io.StringIO()
    with RunProgress(3, 2, Console(file=tty, force_terminal=True, width=120)) as progress:
        progress.update(store)
        task = progress.progress.tasks[0]
        assert task.description == "round 2/3: 1/2 updates in" and task.completed == 1
    assert progress.describe({"phase": "join", "round": "0"}, 1, 0) == "waiting for clients: 1/2 joined"

    pipe = io.StringIO()
    with RunProgress(3, 2, Console(file=pipe, force_terminal=False)) as quiet:
        quiet.update(store)
        assert quiet.progress.tasks[0].completed == 0  # not even read: nothing to show
    assert pipe.getvalue() == ""


# The progress `fedq run` shows on a terminal (a pty) is checked with the run of
# tests/test_strategies_e2e.py (test_fedprox_with_sampling_dirichlet_and_federated_evaluation_on_a_terminal):
# one federation of TensorFlow clients shows both.


def test_status_of_a_long_run_fits_80_columns_with_the_newest_rounds(redis_url: str, r: redis.Redis) -> None:
    make_run(r, "long-run", clients=3, rounds=30, committed=20, refused=(("client-1", 3, "non_finite"),))
    env = cli_env(redis_url)
    env["COLUMNS"] = "80"
    proc = subprocess.run(fedq_cmd("status", "--run", "long-run"), env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in proc.stdout, "no header or cell is cut short at 80 columns"
    assert "rounds (last 8 of 20; 12 earlier not shown)" in proc.stdout
    shown = [int(line.split()[0]) for line in lines if re.match(r"^ *\d+ +3 +303 ", line)]
    assert shown == list(range(13, 21))
    assert "elapsed" in proc.stdout and "ETA" in proc.stdout and "aggregator test-driver (alive)" in proc.stdout


CURSOR_UP = "\x1b[2K\x1b[1A"  # how rich's Live moves back over its last frame, one line at a time


def test_status_watch_on_an_80_by_24_terminal_keeps_the_newest_round_in_view(redis_url: str, r: redis.Redis) -> None:
    import fcntl
    import struct
    import termios

    make_run(r, "long-run", clients=3, rounds=30, committed=20, refused=(("client-1", 3, "non_finite"),))
    env = cli_env(redis_url, TERM="xterm")
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # rows, columns
    proc = subprocess.Popen(fedq_cmd("status", "--run", "long-run", "--watch", "--interval", "0.3"), env=env,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = ""
    try:
        deadline = time.monotonic() + 30
        while seen.count(CURSOR_UP) < 2 * 23 and time.monotonic() < deadline:  # two redraws
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536).decode(errors="replace")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        os.close(master)
    frames = [len(run) // len(CURSOR_UP) + 1 for run in re.findall(f"(?:{re.escape(CURSOR_UP)})+", seen)]
    assert frames and max(frames) <= 24, frames  # each frame fits the terminal's height ...
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", seen).replace("\r", "\n")
    assert max(len(line) for line in text.split("\n")) <= 80  # ... and width
    assert not re.search(r"^ *\.\.\. *$", text, re.M), "rich cut the frame short"
    assert re.search(r"^ *20 +3 +303 ", text, re.M), "the newest round must stay in view"
    assert "Ctrl-C to stop" in text and "rounds (last " in text and "non_finite" in text


def test_overhead_leaves_out_the_wait_for_a_client_that_is_gone(r: redis.Redis) -> None:
    from fedq.ops.dashboard import snapshot
    from fedq.ops.view import run_renderable

    make_run(r, "waited-run", rounds=3)
    store = RunStore(r, "waited-run")
    store.driver = "test-driver"
    c0 = {"num_examples": 10, "loss": 0.4, "accuracy": 0.9, "train_seconds": 1.0, "push_time": time.time() - 20}
    assert store.commit_round(Commit(round=1, global_payload=b"g1", metrics={
        "round": 1, "num_updates": 1, "num_examples": 10, "test_accuracy": 0.8, "seconds": 21.5,
        "overhead_seconds": 20.5, "eval_seconds": 0.3, "missing": {"client-1": "heartbeat expired"},
        "clients": {"client-0": c0}}))
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=False).print(run_renderable(snapshot.run_detail(r, "waited-run")))
    (row,) = [line.split() for line in out.getvalue().splitlines() if re.match(r"^ *1 +1 +10 ", line)]
    overhead_ms = int(row[-1].rstrip("*"))
    assert row[-1].endswith("*") and 300 <= overhead_ms < 2000, row  # not the 20 500 ms recorded
    assert "overhead excludes the wait" in out.getvalue()
