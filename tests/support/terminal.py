"""A command run to completion with a pseudo-terminal as its terminal, the way a person runs it."""

from __future__ import annotations

import os
import pty
import select
import time


def run_on_terminal(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """(exit code, everything it wrote to the terminal); after timeout, what it wrote so far
    and the exit code once killed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: argv with the pty as its terminal
        os.execvpe(argv[0], argv, env)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data.decode(errors="replace"))
    else:
        os.kill(pid, 9)
    _, code = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(code), "".join(chunks)
