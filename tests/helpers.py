"""Test helpers shared by the suites: a redis-server of the tests' own, the CLI as users start it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from fedq.roles.localredis import find_server

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process bound to 127.0.0.1 on a free port; restartable on that port."""

    def __init__(self, *extra: str, ping: bool = True) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="fedq-test-redis-")
        defaults = ["--save", "", "--appendonly", "no"]
        # Later arguments win in redis-server, so callers' options override the defaults.
        self.args = [find_server(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir,
                     *defaults, *extra]
        self.ping = ping  # False for a TLS-only server, which a plain PING cannot reach
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not self.ping:
            return  # the caller knows how to reach it
        deadline = time.monotonic() + 15
        while True:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("test redis-server did not start") from None
                time.sleep(0.05)

    def kill(self, sig: int = 9) -> None:
        """Stop the server abruptly (SIGKILL by default) and wait for it to exit."""
        self.proc.send_signal(sig)
        self.proc.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def fedq_cmd(*args: str) -> list[str]:
    """The fedq CLI as users start it (python -m fedq is the console script's module)."""
    return [sys.executable, "-m", "fedq", *args]


def cli_env(redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDQ_")}
    env["PYTHONUNBUFFERED"] = "1"
    if redis_url:
        env["FEDQ_REDIS_URL"] = redis_url
    return env


SEED_DATA_ENV = "FEDQ_SEED_DATA_DIR"
SEED_DATA_MISSING = (f"the seed's hemodialysis CSVs are not available: set {SEED_DATA_ENV} to the directory "
                     "that holds normal.csv and abnormal.csv (default: ../shared/data/hemodialysis beside "
                     "the repository)")


def seed_data_dir() -> Path | None:
    """The seed's hemodialysis CSVs: FEDQ_SEED_DATA_DIR when set (only there), else shared/ beside
    the repository."""
    env = os.environ.get(SEED_DATA_ENV)
    candidates = [Path(env)] if env else [ROOT.parent / "shared" / "data" / "hemodialysis"]
    for c in candidates:
        if (c / "normal.csv").exists() and (c / "abnormal.csv").exists():
            return c
    return None
