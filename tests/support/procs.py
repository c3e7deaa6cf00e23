"""Processes as users start them, and their cleanup: whole process trees and sessions.

A process a test's command started either descends from it (while its parents live) or stays
in one of the sessions that the command or its descendants created, after it was re-parented
to init. ``Tracker`` follows both, which catches rq work horses (own process group,
re-parented when their worker dies) and servers started in sessions of their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fedq_cmd(*args: str) -> list[str]:
    """The fedq CLI as users start it (python -m fedq is the console script's module)."""
    return [sys.executable, "-m", "fedq", *args]


def cli_env(redis_url: str | None = None, **extra: str) -> dict[str, str]:
    """This environment without FEDQ_* settings or KUBECONFIG, unbuffered, plus ``extra``, with
    FEDQ_REDIS_URL when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDQ_", "KUBECONFIG"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    if redis_url:
        env["FEDQ_REDIS_URL"] = redis_url
    return env


# --- the process table ------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    cmdline: str


def processes() -> dict[int, ProcInfo]:
    """Every live process on this machine (zombies included, marked state 'Z'), from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        found[int(entry)] = ProcInfo(int(entry), int(fields[1]), int(fields[2]), int(fields[3]), fields[0],
                                     raw.replace(b"\0", b" ").decode(errors="replace").strip())
    return found


class Tracker:
    """The processes of one command: its root pid, their descendants, and their sessions (never
    the test's own session)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.pids: set[int] = {root}
        self.sids: set[int] = set()
        self.seen: dict[int, ProcInfo] = {}

    def scan(self) -> list[ProcInfo]:
        """Look again (new processes join the set); returns the live, non-zombie members."""
        procs = processes()
        own = os.getsid(0)
        if self.root in procs and procs[self.root].sid != own:
            self.sids.add(procs[self.root].sid)
        grew = True
        while grew:
            grew = False
            for p in procs.values():
                if p.pid in self.pids:
                    if p.sid not in self.sids and p.sid != own:
                        self.sids.add(p.sid)
                        grew = True
                    continue
                if p.ppid in self.pids or p.sid in self.sids:
                    self.pids.add(p.pid)
                    grew = True
        live = [p for pid, p in procs.items() if pid in self.pids and p.state != "Z"]
        self.seen.update({p.pid: p for p in live})
        return live

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Send sig (SIGKILL by default) to whatever of the set still lives."""
        for p in self.scan():
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass


def kill_tree(pid: int, sig: int = signal.SIGKILL, *, include_root: bool = True) -> None:
    """Send sig to pid's descendants and sessions, as the loss of a node or pod would (an rq
    worker's work horse runs in a process group of its own), then to pid itself."""
    tracker = Tracker(pid)
    for p in tracker.scan():
        if p.pid == pid:
            continue
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass
    if include_root:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Proc:
    """A fedq CLI process (or any argv with ``raw=True``) with its output in ``logs/<name>.log``.

    Started in a session of its own, so ``stop`` can end everything it started: SIGTERM first
    (a clean stop), then SIGKILL to its whole tree and sessions."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path, *, raw: bool = False,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args if raw else fedq_cmd(*args), env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        self.tracker = Tracker(self.proc.pid)
        self.tracker.scan()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        """Send sig; SIGKILL takes the whole tree and its sessions too."""
        if sig == signal.SIGKILL:
            self.tracker.scan()
            kill_tree(self.proc.pid, sig)
            self.tracker.kill_all()
        else:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code; after timeout, stop it and fail with its log."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.name} did not finish in {timeout:g} s; log:\n{self.text()[-3000:]}") from None

    def stop(self, grace: float = 15) -> None:
        """Terminate it (grace seconds to exit cleanly), then SIGKILL whatever of its tree and
        sessions remains."""
        self.tracker.scan()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.tracker.kill_all()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
