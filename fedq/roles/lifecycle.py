"""Process lifetimes: every process fedq starts ends with the process that started it.

Linux's PR_SET_PDEATHSIG asks the kernel to signal a process when the *thread* that forked it
exits. It is not inherited across fork, so each generation sets it for itself: ``fedq run``'s
children in a preexec_fn, an rq work horse right after the worker forked it, the initial model's
builder when it starts.

A process whose parent died is an orphan: nobody is left to read its output or wait for it, and
for processes of ``fedq run`` the private Redis goes down with the parent. Such a process gets a
few seconds to stop gracefully (release a run's lease when Redis is still there), then
``exit_soon`` ends it, so that it does not retry a Redis that is gone for minutes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger("fedq.roles.lifecycle")

_PR_SET_PDEATHSIG = 1
# Seconds an orphan has to stop on its own before it is ended.
ORPHAN_GRACE = 2.0


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send sig to this process when its parent exits (no-op elsewhere).

    Usable as a subprocess preexec_fn; call ``parent_died(expected)`` afterwards where the
    parent may already have exited before this call (the kernel then sends nothing)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
        except OSError:
            pass


def parent_died(expected: int) -> bool:
    """True when this process's parent is no longer expected (it exited; we were re-parented)."""
    return os.getppid() != expected


def exit_soon(grace: float = ORPHAN_GRACE, code: int = 1,
              before: Callable[[], None] = lambda: None) -> threading.Timer:
    """End this process in grace seconds, whatever it is doing then (a daemon timer).

    before runs first (e.g. to kill a child). os._exit skips atexit handlers and does not take
    the logging locks, which a thread stuck in a Redis retry may hold."""
    def end() -> None:
        try:
            before()
        finally:
            os._exit(code)

    timer = threading.Timer(grace, end)
    timer.daemon = True
    timer.start()
    return timer
