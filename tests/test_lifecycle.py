"""Stopping `fedq run` stops everything it started: worker, work horse, clients, builder, Redis.

Processes are found by walking the whole process tree and by Unix session, again and again,
so that rq work horses (their own process group, re-parented when their worker dies) and the
private Redis (a session of its own) are seen too, including those started after a first look.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.procs import ProcInfo, Tracker, cli_env, fedq_cmd
from support.wait import wait_until

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

STOPPED_WITHIN = 5.0  # seconds from the signal until nothing of the run is left


def _is_horse(p: ProcInfo, tracker: Tracker) -> bool:
    # rq forks the horse from the worker and moves it to a process group of its own. With
    # setproctitle installed rq renames both ("rq:worker:..."), else they keep fedq's command line.
    named = " aggregator " in f"{p.cmdline} " or p.cmdline.startswith("rq:worker:")
    return named and p.pgid == p.pid and p.ppid in tracker.pids


def _wait_for(tracker: Tracker, proc: subprocess.Popen, log: Path, timeout: float) -> list[ProcInfo]:
    """Wait until the run has its work horse, both clients and its Redis; returns the processes."""
    def going() -> list[ProcInfo] | None:
        live = tracker.scan()
        names = " | ".join(p.cmdline for p in live)
        if (any(_is_horse(p, tracker) for p in live) and names.count(" client ") == 2
                and ("redis-server" in names or "valkey-server" in names)):
            return live
        assert proc.poll() is None, f"fedq run exited {proc.poll()} before it got going; output:\n{log.read_text()}"
        return None

    return wait_until(going, "fedq run to get going", timeout, every=0.2, detail=lambda: log.read_text())


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_stopping_fedq_run_leaves_nothing(how: str, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"  # the run's temporary directories must all go
    tmp.mkdir()
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    env = dict(cli_env(None), TMPDIR=str(tmp))
    proc = subprocess.Popen(fedq_cmd("run", "--clients", "2", "--rounds", "500", "--local-epochs", "1",
                                     "--out", str(out)),
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    tracker = Tracker(proc.pid)
    try:
        before = _wait_for(tracker, proc, log, timeout=120)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends: fedq run's process group
        else:
            os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        signalled = time.monotonic()
        left = tracker.scan()
        while left and time.monotonic() - signalled < STOPPED_WITHIN:
            proc.poll()  # reap fedq run itself, our child
            time.sleep(0.1)
            left = tracker.scan()
        took = time.monotonic() - signalled
        print(f"{how}: {len(before)} processes gone {took:.1f} s after the signal")
        assert not left, (f"{how}: after {took:.1f} s still running:\n"
                          + "\n".join(f"{p.pid} {p.cmdline}" for p in left)
                          + "\nrunning before the signal:\n" + "\n".join(f"{p.pid} {p.cmdline}" for p in before))
        assert not list(tmp.iterdir()), f"{how}: temporary files left behind: {list(tmp.iterdir())}"
        agg_log = (out / "logs" / "aggregator.log").read_text(errors="replace")
        assert "ConnectionError" not in agg_log, agg_log[-3000:]
    finally:
        tracker.kill_all()
        proc.kill()
        proc.wait(timeout=10)
