"""Find every process a command started, however it was detached: by parentage and by session.

A process that a test's command started either descends from it (while its parents live) or
stays in one of the sessions that the command or its descendants created, after it was
re-parented to init. Tracking both catches rq work horses (own process group, re-parented when
their worker dies) and servers started in sessions of their own.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    cmdline: str


def processes() -> dict[int, Proc]:
    """Every live process on this machine (zombies included, marked state 'Z')."""
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
        found[int(entry)] = Proc(int(entry), int(fields[1]), int(fields[2]), int(fields[3]), fields[0],
                                 raw.replace(b"\0", b" ").decode(errors="replace").strip())
    return found


class Tracker:
    """The processes of one command: its root pid, their descendants, and their sessions."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.pids: set[int] = {root}
        self.sids: set[int] = set()
        self.seen: dict[int, Proc] = {}

    def scan(self) -> list[Proc]:
        """Look again (new processes join the set); returns the live, non-zombie members."""
        procs = processes()
        if self.root in procs:
            self.sids.add(procs[self.root].sid)
        grew = True
        while grew:
            grew = False
            for p in procs.values():
                if p.pid in self.pids:
                    if p.sid not in self.sids and p.sid != os.getsid(0):
                        self.sids.add(p.sid)
                        grew = True
                    continue
                if p.ppid in self.pids or p.sid in self.sids:
                    self.pids.add(p.pid)
                    grew = True
        live = [p for pid, p in procs.items() if pid in self.pids and p.state != "Z"]
        self.seen.update({p.pid: p for p in live})
        return live

    def kill_all(self) -> None:
        """SIGKILL whatever of the set still lives (a test's cleanup after a failure)."""
        for p in self.scan():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
