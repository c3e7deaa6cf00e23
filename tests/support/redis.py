"""A redis-server process of the tests' own, bound to 127.0.0.1 on a free port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable

import redis as redis_py

from fedq.roles.localredis import find_server
from support.wait import wait_until


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server on a free 127.0.0.1 port, restartable on that port (``kill`` then ``start``).

    ``extra`` are redis-server options; later ones win, so they override the defaults (no
    snapshots, no AOF). It is ready when a plain PING answers, or, for a server a plain PING
    cannot reach (ACL users only, TLS only), when ``ready(server)`` is true; ``ping=False``
    returns at once."""

    def __init__(self, *extra: str, ping: bool = True, ready: Callable[[RedisServer], bool] | None = None) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="fedq-test-redis-")
        defaults = ["--save", "", "--appendonly", "no"]
        self.args = [find_server(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir,
                     *defaults, *extra]
        self.ping = ping
        self.ready = ready
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not self.ping:
            return  # the caller knows how to reach it
        client = redis_py.Redis(port=self.port, socket_timeout=1)
        ready = self.ready or (lambda _server: bool(client.ping()))

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"test redis-server exited with {self.proc.returncode}: {self.args}")
            return ready(self)

        try:
            wait_until(up, "the test redis-server to be ready", timeout=15, every=0.05,
                       ignore=(redis_py.ConnectionError, OSError))
        finally:
            client.close()

    def kill(self, sig: int = 9) -> None:
        """Stop the server abruptly (SIGKILL by default) and wait for it to exit."""
        self.proc.send_signal(sig)
        self.proc.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw: object) -> redis_py.Redis:
        return redis_py.Redis.from_url(self.url, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
